import BerthRegistry

/// The features scenario's section of the report (FeaturesScenario.swift).
extension ScenarioReport {
    func featuresText(_ features: FeaturesResult) -> String {
        let rounds = Set(features.windows.map(\.round)).count
        var out = "Features: new connections (\(options.concurrentConnects) in flight, \(Format.fixed(options.phaseSeconds, 1)) s windows "
        out += "after \(Format.fixed(options.warmupSeconds, 1)) s warm-up) through berth proxy (1 worker on CPU \(proxyCPU), "
        out += "2 whoami backends and the load generator on CPU \(loadCPU)), one fresh proxy per window, every variant once "
        out += "per round in a rotated order, \(rounds) round(s); ratios against \"off\" (all features off) in the same round, "
        out += "median and range over the rounds"
        out += options.berthBeforePath.map { "; \"before\" is \($0) with its defaults\n" } ?? "\n"
        if let skipped = features.skipped { return out + "skipped: \(skipped)\n\n" }
        out += Self.row("", ["conn/s", "vs off", "lowest", "highest", "proxy", "vs off", "errors"])
        out += Self.row("", ["mean", "median", "ratio", "ratio", "us/conn", "median", ""])
        for variant in features.variants {
            let rates = features.ratios(variant) { $0.connectionsPerSecond }
            let costs = features.ratios(variant) { $0.proxyMicrosecondsPerConnection }
            let errors = features.windows(variant).reduce(UInt64(0)) { $0 + $1.errors }
            out += Self.row(variant, [
                features.mean(variant).map { Format.rate($0) } ?? "-", Format.ratio(FeaturesResult.median(rates)),
                Format.ratio(rates.min()), Format.ratio(rates.max()),
                features.meanCost(variant).map { Format.fixed($0, 1) } ?? "-", Format.ratio(FeaturesResult.median(costs)),
                "\(errors)",
            ])
        }
        return out + "\n"
    }

    func featuresJSON(_ features: FeaturesResult) -> JSONValue {
        if let skipped = features.skipped { return .object([("skipped", .string(skipped))]) }
        return .object([
            ("before", options.berthBeforePath.map { .string($0) } ?? .null),
            ("variants", .array(features.variants.map { variant in
                .object([
                    ("name", .string(variant)),
                    ("connectionsPerSecond", .optional(features.mean(variant))),
                    ("ratio", .optional(FeaturesResult.median(features.ratios(variant) { $0.connectionsPerSecond }))),
                    ("proxyMicrosecondsPerConnection", .optional(features.meanCost(variant))),
                    ("costRatio", .optional(FeaturesResult.median(features.ratios(variant) { $0.proxyMicrosecondsPerConnection }))),
                ])
            })),
            ("windows", .array(features.windows.map { window in
                .object([
                    ("variant", .string(window.variant)), ("round", .integer(Int64(window.round + 1))),
                    ("connectionsPerSecond", .number(window.connectionsPerSecond)),
                    ("proxyMicrosecondsPerConnection", .optional(window.proxyMicrosecondsPerConnection)),
                    ("disturbanceCPUs", .number(window.disturbance)), ("errors", .integer(Int64(window.errors))),
                ])
            })),
            ("failures", .array(features.failures.map { .string($0) })),
        ])
    }
}
