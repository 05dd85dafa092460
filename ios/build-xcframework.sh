#!/usr/bin/env bash
# Builds ios/OneStepFFI.xcframework from the C ABI crate (onestep-capi): static libraries for iOS devices
# (aarch64-apple-ios), the simulator (aarch64-apple-ios-sim + x86_64-apple-ios, merged with lipo) and
# macOS (aarch64 + x86_64), each with capi/include/onestep.h and the module map. Needs a Mac with Xcode:
#
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin
#   ios/build-xcframework.sh
#   cd ios && swift build && swift test   # Tests/ need ONESTEP_TEST_MODEL=/path/to/model.onnx
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
die() { echo "ios/build-xcframework.sh: error: $*" >&2; exit 1; }
[[ "$(uname -s)" == Darwin ]] || die "needs macOS with Xcode (xcodebuild, lipo)"
command -v xcodebuild >/dev/null || die "xcodebuild not found"

targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
cd "$ROOT"
for t in "${targets[@]}"; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t"
    cargo rustc --release --target "$t" -p onestep-capi --crate-type staticlib
done
lib() { echo "$TARGET/$1/release/libonestep_capi.a"; }

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/headers" "$STAGE/sim" "$STAGE/macos"
cp capi/include/onestep.h ios/module/module.modulemap "$STAGE/headers/"
lipo -create "$(lib aarch64-apple-ios-sim)" "$(lib x86_64-apple-ios)" -output "$STAGE/sim/libonestep_capi.a"
lipo -create "$(lib aarch64-apple-darwin)" "$(lib x86_64-apple-darwin)" -output "$STAGE/macos/libonestep_capi.a"

rm -rf "$HERE/OneStepFFI.xcframework"
xcodebuild -create-xcframework \
    -library "$(lib aarch64-apple-ios)" -headers "$STAGE/headers" \
    -library "$STAGE/sim/libonestep_capi.a" -headers "$STAGE/headers" \
    -library "$STAGE/macos/libonestep_capi.a" -headers "$STAGE/headers" \
    -output "$HERE/OneStepFFI.xcframework"
echo "built $HERE/OneStepFFI.xcframework"
