#!/usr/bin/env bash
# Builds the JNI library (crate onestep-jni) for Android into src/main/jniLibs/<abi>/libonestep_jni.so
# with cargo-ndk, for arm64-v8a, armeabi-v7a and x86_64. Run on a machine with the Android NDK:
#
#   export ANDROID_NDK_HOME=/path/to/ndk   # r26 or newer
#   cargo install cargo-ndk
#   rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
#   android/build-so.sh [--debug|--mobile]  # ONESTEP_FEATURES=cpu: a CPU-only library (no wgpu)
#
# Then build the library module with Gradle (android/build.gradle.kts) and depend on it from an app.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE=(--release)
[[ "${1:-}" == "--debug" ]] && PROFILE=()
# --mobile: the size-optimized profile (fat LTO, dependencies at opt-level z, stripped) the app-store
# sizes are measured with (scripts/check-mobile); needs a cargo-ndk that copies custom profiles' output.
[[ "${1:-}" == "--mobile" ]] && PROFILE=(--profile mobile)
die() { echo "android/build-so.sh: error: $*" >&2; exit 1; }
[[ -n "${ANDROID_NDK_HOME:-}${ANDROID_NDK_ROOT:-}" ]] || die "set ANDROID_NDK_HOME to the Android NDK"
command -v cargo-ndk >/dev/null || die "cargo-ndk not found (cargo install cargo-ndk)"
for t in aarch64-linux-android armv7-linux-androideabi x86_64-linux-android; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
cd "$ROOT"
# 16 KB pages (Android 15+, required by Google Play): .cargo/config.toml gives every Android target
# these link flags, but RUSTFLAGS / CARGO_ENCODED_RUSTFLAGS in the environment (set by the user or by
# an older cargo-ndk) replace a config's target rustflags, so they are passed here as well; the
# program headers are checked below either way.
# The size flags of .cargo/config.toml too: packed relocations (API >= 23) and identical code folding.
PAGE_FLAGS=(-C link-arg=-Wl,-z,max-page-size=16384 -C link-arg=-Wl,-z,common-page-size=16384
    -C link-arg=-Wl,--pack-dyn-relocs=android -C link-arg=-Wl,--icf=all)
if [[ -n "${RUSTFLAGS:-}" ]]; then
    export RUSTFLAGS="$RUSTFLAGS ${PAGE_FLAGS[*]}"
else
    sep=$'\x1f'
    enc="${CARGO_ENCODED_RUSTFLAGS:-}"
    for f in "${PAGE_FLAGS[@]}"; do enc="${enc:+$enc$sep}$f"; done
    export CARGO_ENCODED_RUSTFLAGS="$enc"
fi
# GPU: the `gpu` feature (default) builds wgpu with Vulkan only on Android. ONESTEP_FEATURES=cpu builds
# a CPU-only library (no wgpu).
FEATURES=()
[[ "${ONESTEP_FEATURES:-gpu}" == "cpu" ]] && FEATURES=(--no-default-features)
# API level 24 (Android 7.0) matches minSdk in build.gradle.kts.
cargo ndk --platform 24 -t arm64-v8a -t armeabi-v7a -t x86_64 -o "$HERE/src/main/jniLibs" \
    build "${PROFILE[@]}" -p onestep-jni "${FEATURES[@]}"
ls -l "$HERE"/src/main/jniLibs/*/libonestep_jni.so
# Every LOAD segment 16 KB aligned (the NDK's llvm-readelf when there is no binutils readelf).
NDK="${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-}}"
if ! command -v readelf >/dev/null && [[ -z "${READELF:-}" ]]; then
    for r in "$NDK"/toolchains/llvm/prebuilt/*/bin/llvm-readelf; do [[ -x "$r" ]] && export READELF="$r"; done
fi
"$ROOT/scripts/check-page-align" "$HERE"/src/main/jniLibs/*/libonestep_jni.so
