"""Copies etcd's protos, stripped for Berth's generated client (see scripts/generate-etcd).

Removes gogoproto and google.api annotations and their imports, and every service and RPC not in
KEEP. Messages, package names and field numbers are kept as they are.
"""
import pathlib
import re
import sys

KEEP = {
    "KV": {"Range", "Put", "DeleteRange", "Txn", "Compact"},
    "Watch": {"Watch"},
    "Lease": {"LeaseGrant", "LeaseRevoke", "LeaseKeepAlive", "LeaseTimeToLive"},
    "Maintenance": {"Status"},
    "Auth": {"Authenticate"},
}
FILES = ["etcdserver/etcdserverpb/rpc.proto", "mvcc/mvccpb/kv.proto", "auth/authpb/auth.proto"]


def block_end(text, start):
    """Index just past the brace block that opens at or after start."""
    depth = 0
    index = text.index("{", start)
    while True:
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1


def strip_services(text):
    out, position = [], 0
    for match in re.finditer(r"^service (\w+) \{", text, re.M):
        if match.start() < position:
            continue
        end = block_end(text, match.start())
        out.append(text[position:match.start()])
        name = match.group(1)
        if name in KEEP:
            body = text[match.start():end]
            kept, cursor = [], 0
            for rpc in re.finditer(r"^(\s*//[^\n]*\n)*\s*rpc (\w+)\(", body, re.M):
                if rpc.start() < cursor:
                    continue
                rpc_end = block_end(body, rpc.start())
                kept.append(body[cursor:rpc.start()])
                if rpc.group(2) in KEEP[name]:
                    # The signature, without its body of google.api.http options.
                    signature = body[rpc.start():body.index("{", rpc.start())]
                    kept.append(signature.rstrip() + " {}")
                cursor = rpc_end
            kept.append(body[cursor:])
            out.append("".join(kept))
        position = end
    out.append(text[position:])
    return "".join(out)


def strip(text):
    text = re.sub(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text, flags=re.M)
    text = re.sub(r"^option \(gogoproto\.[^;]*;\n", "", text, flags=re.M)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    return strip_services(text)


def main(source, destination):
    for relative in FILES:
        text = (pathlib.Path(source) / relative).read_text()
        target = pathlib.Path(destination) / "etcd" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        header = f"// Stripped copy of etcd 3.4's {relative} (Debian golang-etcd-server-dev), by scripts/generate-etcd.\n"
        target.write_text(header + strip(text))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
