"""The contract itself: stubs are fresh, and every message, field, service and rpc is documented."""

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_element_is_commented(tmp_path):
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos/rise/v1").glob("*.proto"))
    assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                        "--include_source_info", f"--descriptor_set_out={out}", *protos]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    undocumented = []
    for f in files:
        comments = {tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip() for loc in f.source_code_info.location}
        for i, message in enumerate(f.message_type):
            # A field is documented by its own comment, or its message documents it (one-field
            # messages such as ModelRef carry the explanation on the message).
            message_doc = comments.get((4, i), "")
            if not message_doc and not message.field:
                undocumented.append(f"{f.name}: message {message.name}")
            for j, field in enumerate(message.field):
                if not comments.get((4, i, 2, j)) and not (len(message.field) == 1 and message_doc):
                    if field.type_name.endswith((".ModelRef", ".ResponseMeta", ".ServerTiming")) or field.name in ("request_id",):
                        continue  # self-describing shared types, documented where they are defined
                    undocumented.append(f"{f.name}: {message.name}.{field.name}")
        for i, service in enumerate(f.service):
            if not comments.get((6, i)) and not all(comments.get((6, i, 2, j)) for j in range(len(service.method))):
                undocumented.append(f"{f.name}: service {service.name}")
    assert not undocumented, "document these in protos/rise/v1: " + ", ".join(undocumented)
