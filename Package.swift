// swift-tools-version:6.0
import PackageDescription

// Import direction (DESIGN.md §7): berth → {BerthHealth, BerthWhoami, later Registrar/Discovery/Stats} → BerthEngine → CBerthShims.
// BerthEngine imports nothing of ours but the C shim, and no SwiftNIO: the data plane is Glibc only.
let package = Package(
    name: "Berth",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "berth", targets: ["berth"]),
        .executable(name: "bench", targets: ["bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        .target(name: "CBerthShims"),
        .target(
            name: "BerthEngine",
            dependencies: ["CBerthShims"],
            swiftSettings: [
                // The event loop touches session and worker fields through inout on every
                // event; runtime exclusivity checks cost more instructions than the syscalls'
                // user-space side (callgrind: ~60%). Debug builds, which run the tests, keep them.
                .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
            ]
        ),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        .target(
            name: "BerthHealth",
            dependencies: ["BerthEngine", "COpenSSL"]
        ),
        .target(
            name: "BerthWhoami",
            dependencies: ["BerthEngine", "CBerthShims"]
        ),
        .executableTarget(
            name: "berth",
            dependencies: [
                "BerthEngine",
                "BerthHealth",
                "BerthWhoami",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "bench",
            dependencies: [
                "BerthEngine",
                "BerthWhoami",
                "CBerthShims",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Benchmarks/bench"
        ),
        .testTarget(
            name: "BerthEngineTests",
            dependencies: ["BerthEngine", "BerthWhoami", "CBerthShims"]
        ),
        .testTarget(
            name: "BerthHealthTests",
            dependencies: ["BerthHealth", "BerthEngine", "BerthWhoami"]
        ),
        .testTarget(
            name: "BerthCLITests",
            dependencies: ["BerthEngine", "CBerthShims"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
