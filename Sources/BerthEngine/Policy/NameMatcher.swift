/// Finds, for each frontend of a new table in turn, the position of the frontend of the same
/// name in the previous table, without hashing names: both tables are usually in the same
/// order with a few frontends added or removed (discovery's are sorted by name), so the next
/// previous name, or the one after it, is almost always the match; a name is compared by
/// `==`, which is a pointer comparison when both come from the same string. Only a table in
/// another order costs a dictionary, built once. Pure.
public struct NameMatcher {
    private let names: [String]
    /// The previous names are in ascending order (a name between two neighbours is new):
    /// found out at the first name that is not the next previous one (nil until then).
    private var sorted: Bool?
    private var cursor = 0
    private var lastAsked: String?
    /// Every name asked so far came in ascending order. Compared only at a name that is not the
    /// next previous one: a name that is follows the one before in the previous order, so the
    /// pair is in ascending order whenever the previous names are (and when they are not, the
    /// flag is never read).
    private var ascending = true
    private var index: [String: Int]?
    /// Previous positions matched so far.
    public private(set) var matched = 0

    public init(previous names: [String]) {
        self.names = names
    }

    /// The position in the previous table of `name` (asked in the new table's order), or nil
    /// for a name the previous table did not have.
    public mutating func position(of name: String) -> Int? {
        defer { lastAsked = name }
        if cursor < names.count && names[cursor] == name { return take(cursor) }
        if let lastAsked, !(lastAsked < name) { ascending = false }
        if sorted == nil { sorted = zip(names, names.dropFirst()).allSatisfy { $0 < $1 } }
        // Both in ascending order so far (discovery's tables): a merge. Names passed over were
        // removed; a name that is not next is new.
        if sorted == true && ascending {
            while cursor < names.count && names[cursor] < name { cursor += 1 }
            if cursor < names.count && names[cursor] == name { return take(cursor) }
            return nil
        }
        if index == nil {
            var built: [String: Int] = [:]
            built.reserveCapacity(names.count)
            for (position, name) in names.enumerated() { built[name] = position }
            index = built
        }
        guard let position = index![name] else { return nil }
        return take(position)
    }

    /// Whether the matcher had to index the previous names (tests).
    var builtIndex: Bool { index != nil }

    /// Whether every previous name was matched (none was removed), once the new table is done.
    public var matchedAll: Bool { matched == names.count }

    private mutating func take(_ position: Int) -> Int {
        cursor = position + 1
        matched += 1
        return position
    }
}
