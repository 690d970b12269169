// The executable the process-level tests run.
import Foundation

/// The `berth` executable: `BERTH_BINARY`, else `.build/debug/berth` of this package
/// (scripts/test builds it first).
public enum BerthBinary {
    public static var path: String {
        if let override = ProcessInfo.processInfo.environment["BERTH_BINARY"], !override.isEmpty { return override }
        var root = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { root.deleteLastPathComponent() }  // BerthBinary.swift, BerthTestSupport, Tests
        return root.appendingPathComponent(".build/debug/berth").path
    }
}
