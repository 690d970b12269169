// swift-tools-version:6.1
import PackageDescription

// Import direction (docs/ARCHITECTURE.md): berth → {BerthDiscovery, BerthRegistrar, BerthStats, BerthWhoami};
// BerthDiscovery → {BerthEngine, BerthHealth, BerthRegistry, BerthEtcd}; BerthRegistrar → {BerthRegistry,
// BerthEtcd}; every module of ours → BerthSystem → CBerthShims.
// BerthSystem is the OS (syscalls, descriptors, epoll, sockets, threads, the event-loop core);
// BerthEngine is the data plane alone. Neither imports SwiftNIO: the data plane is Glibc only.
// BerthRegistry is the key schema and its values: pure, so the registrar needs no engine.
// Extension members are visible only from modules a file imports itself (MemberImportVisibility on
// every target, and every module a target imports is declared here), so that, say,
// `String.contains` is the standard library's and not Foundation's (reached through a
// dependency): the binary links FoundationEssentials only, not Foundation and its ICU data.
let memberImports: SwiftSetting = .enableUpcomingFeature("MemberImportVisibility")

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
        // Control plane only (etcd, Docker, stats): never imported by BerthEngine.
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        // Without its default traits: BinaryDelimitedStreams imports all of Foundation, which
        // would link libFoundation, FoundationInternationalization and the ICU data into berth
        // (about 5.7 MiB of resident memory; grpc-swift-protobuf opts out the same way).
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0", traits: []),
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
    ],
    targets: [
        .target(name: "CBerthShims"),
        .target(
            // What every module needs of the OS: the syscall chokepoint, descriptors, epoll,
            // sockets, addresses, threads, clocks, and the event-loop core.
            name: "BerthSystem",
            dependencies: ["CBerthShims"],
            swiftSettings: [
                // The workers call these wrappers (and SlotTable, Epoll.event, PipePool) on every
                // event; across the module boundary they must still inline and specialise as they
                // did when they were the engine's own files (callgrind, keep-alive: without it,
                // SlotTable.lookup unspecialised and 2.8x the retain/release per request).
                .unsafeFlags(["-enforce-exclusivity=unchecked", "-cross-module-optimization"], .when(configuration: .release)),
                memberImports,
            ]
        ),
        .target(
            // The registry's key schema and values (records, `_config`, durations): pure.
            name: "BerthRegistry",
            dependencies: ["BerthSystem"],
            swiftSettings: [memberImports]
        ),
        .target(
            name: "BerthEngine",
            dependencies: ["BerthSystem", "CBerthShims"],
            swiftSettings: [
                // The event loop touches session and worker fields through inout on every
                // event; runtime exclusivity checks cost more instructions than the syscalls'
                // user-space side (callgrind: ~60%). Debug builds, which run the tests, keep them.
                .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
                memberImports,
            ]
        ),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        .target(
            name: "BerthHealth",
            dependencies: ["BerthEngine", "BerthSystem", "COpenSSL"],
            swiftSettings: [memberImports]
        ),
        .target(
            name: "BerthWhoami",
            dependencies: ["BerthSystem", "CBerthShims"],
            swiftSettings: [memberImports]
        ),
        .target(
            // etcd v3 over its own gRPC API; code generated from etcd's protos (scripts/generate-etcd).
            name: "BerthEtcd",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: [memberImports]
        ),
        .target(
            // Key schema, catalog, etcd watch → routing tables.
            name: "BerthDiscovery",
            dependencies: [
                "BerthEngine",
                "BerthRegistry",
                "BerthSystem",
                "BerthHealth",
                "BerthEtcd",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: [memberImports]
        ),
        .target(
            // Docker Engine API client and registration under one lease.
            name: "BerthRegistrar",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                "BerthRegistry",
                "BerthSystem",
                "BerthEtcd",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: [memberImports]
        ),
        .target(
            // The stats and admin HTTP server on :1936 and its renderers.
            name: "BerthStats",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                "BerthEngine",
                "BerthHealth",
                "BerthRegistry",
                "BerthSystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: [memberImports]
        ),
        .executableTarget(
            name: "berth",
            dependencies: [
                "BerthEngine",
                "BerthRegistry",
                "BerthSystem",
                "BerthHealth",
                "BerthWhoami",
                "BerthEtcd",
                "BerthDiscovery",
                "BerthRegistrar",
                "BerthStats",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: [memberImports],
            // Resident memory (docs/ARCHITECTURE.md, "Memory"): the Swift runtime linked in, only
            // the parts used; lld with packed relative relocations (DT_RELR, glibc 2.36), so the
            // loader reads kilobytes of relocations instead of megabytes; and no dynamic symbol
            // table of every Swift symbol (the static runtime's link arguments export them all),
            // which the loader's symbol lookups would page in.
            linkerSettings: [
                .unsafeFlags([
                    "-static-stdlib", "-use-ld=lld",
                    "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs",
                    "-Xlinker", "--no-export-dynamic",
                    // The static FoundationEssentials' own dependencies, which only modules
                    // compiled with -static-stdlib would name.
                    "-l_FoundationCollections", "-l_FoundationCShims",
                ], .when(platforms: [.linux], configuration: .release)),
            ]
        ),
        .executableTarget(
            name: "bench",
            dependencies: [
                "BerthEngine",
                "BerthRegistry",
                "BerthSystem",
                "BerthWhoami",
                "CBerthShims",
                // The discovery scenario writes the registry (the processes under test are berth's).
                "BerthEtcd",
                // The stats-fuzz role throws the stats fuzz test's cases (StatsFuzzCases).
                "BerthTestSupport",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Benchmarks/bench",
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthEngineTests",
            dependencies: ["BerthEngine", "BerthRegistry", "BerthSystem", "BerthWhoami", "CBerthShims", "BerthTestSupport"],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthHealthTests",
            dependencies: ["BerthTestSupport", "BerthHealth", "BerthEngine", "BerthSystem", "BerthWhoami"],
            swiftSettings: [memberImports]
        ),
        .target(
            // Fixtures for tests only: a real etcd (one member or a cluster), a real dockerd.
            name: "BerthTestSupport",
            dependencies: ["BerthEngine", "BerthSystem", "CBerthShims"],
            path: "Tests/BerthTestSupport",
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthEtcdTests",
            dependencies: ["BerthEtcd", "BerthTestSupport"],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthDiscoveryTests",
            dependencies: ["BerthTestSupport", "BerthDiscovery", "BerthEtcd", "BerthEngine", "BerthHealth", "BerthRegistry", "BerthSystem", "BerthWhoami"],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthRegistrarTests",
            dependencies: [
                "BerthTestSupport", "BerthRegistrar", "BerthDiscovery", "BerthEtcd", "BerthRegistry", "BerthSystem",
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthStatsTests",
            dependencies: ["BerthTestSupport", "BerthStats", "BerthEngine", "BerthHealth", "BerthSystem", "BerthWhoami"],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            // The seed's walkthrough on one machine: real etcd, two real dockerds, berth processes.
            name: "EndToEndTests",
            dependencies: ["BerthTestSupport"],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            name: "BerthCLITests",
            dependencies: ["BerthTestSupport", "BerthDiscovery", "BerthEngine", "BerthEtcd", "BerthSystem", "CBerthShims"],
            swiftSettings: [memberImports]
        ),
        .testTarget(
            // The failure matrix: berth processes on hosts made of network namespaces
            // (NetworkTestBed), under partitions, dead links, silent backends, delay and loss.
            name: "NetworkTests",
            dependencies: ["BerthTestSupport", "BerthEngine", "BerthSystem"],
            swiftSettings: [memberImports]
        ),
    ],
    swiftLanguageModes: [.v6]
)
