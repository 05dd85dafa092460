// swift-tools-version:5.9
// The onestep Swift package: a thin Swift API (Sources/OneStep) over the C ABI, shipped as
// OneStepFFI.xcframework (static libraries + onestep.h + module map), built by build-xcframework.sh
// on a Mac.
import PackageDescription

let package = Package(
    name: "OneStep",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "OneStep", targets: ["OneStep"]),
    ],
    targets: [
        .binaryTarget(name: "OneStepFFI", path: "OneStepFFI.xcframework"),
        .target(
            name: "OneStep",
            dependencies: ["OneStepFFI"],
            path: "Sources/OneStep",
            // Harmless if unused: some versions of Rust's random-number crates call into Security.
            linkerSettings: [.linkedFramework("Security")]
        ),
        .testTarget(name: "OneStepTests", dependencies: ["OneStep"], path: "Tests/OneStepTests"),
    ]
)
