#!/usr/bin/env bash
# Builds the JNI library (crate onestep-jni) for Android into src/main/jniLibs/<abi>/libonestep_jni.so
# with cargo-ndk, for arm64-v8a, armeabi-v7a and x86_64. Run on a machine with the Android NDK:
#
#   export ANDROID_NDK_HOME=/path/to/ndk   # r26 or newer
#   cargo install cargo-ndk
#   rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
#   android/build-so.sh [--debug]
#
# Then build the library module with Gradle (android/build.gradle.kts) and depend on it from an app.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE=(--release)
[[ "${1:-}" == "--debug" ]] && PROFILE=()
die() { echo "android/build-so.sh: error: $*" >&2; exit 1; }
[[ -n "${ANDROID_NDK_HOME:-}${ANDROID_NDK_ROOT:-}" ]] || die "set ANDROID_NDK_HOME to the Android NDK"
command -v cargo-ndk >/dev/null || die "cargo-ndk not found (cargo install cargo-ndk)"
for t in aarch64-linux-android armv7-linux-androideabi x86_64-linux-android; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
cd "$ROOT"
# API level 24 (Android 7.0) matches minSdk in build.gradle.kts.
cargo ndk --platform 24 -t arm64-v8a -t armeabi-v7a -t x86_64 -o "$HERE/src/main/jniLibs" \
    build "${PROFILE[@]}" -p onestep-jni
ls -l "$HERE"/src/main/jniLibs/*/libonestep_jni.so
