"""Calls lazyserve's Generate with Python grpcio, from stubs generated out of proto/.

Usage: generate_client.py ADDRESS PROMPT MAX_TOKENS
Prints one JSON object: the streamed text and token ids, the completion, the health
status, and the services that server reflection lists.
"""

import json
import pathlib
import sys
import tempfile

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

PROTO = pathlib.Path(__file__).resolve().parents[2] / "proto"


def stubs():
    """Generates the lazyserve.v1 Python modules into a temporary folder and imports them."""
    out = tempfile.mkdtemp(prefix="lazyserve-stubs-")
    files = [str(p) for p in sorted((PROTO / "lazyserve/v1").glob("*.proto"))]
    rc = protoc.main(["protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from lazyserve.v1 import generate_pb2, generate_pb2_grpc

    return generate_pb2, generate_pb2_grpc


def main():
    address, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pb, rpc = stubs()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = [s.name for s in listed.list_services_response.service]

        text, token_ids, complete = "", [], None
        request = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens)
        for response in rpc.GenerationStub(channel).Generate(request, timeout=120):
            kind = response.WhichOneof("event")
            if kind == "chunk":
                text += response.chunk.text
                token_ids += list(response.chunk.token_ids)
            elif kind == "complete":
                complete = json_format.MessageToDict(response.complete)
            else:
                raise SystemExit(f"stream error: {response.error}")
    print(json.dumps({
        "text": text,
        "token_ids": token_ids,
        "complete": complete,
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
        "services": services,
    }))


if __name__ == "__main__":
    main()
