#!/usr/bin/env python3
"""Writes the seed corpora under corpus/<target>/ (run from fuzz/: ./seeds.py).

Protobufs are encoded by hand (field numbers from mesh-core/proto), so no build is needed;
CSRs come from openssl.
"""
import os
import shutil
import subprocess


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def field(number, value):
    """A length-delimited field (strings, bytes, messages) or a varint (ints)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | 2) + varint(len(value)) + value


def message(*fields):
    return b"".join(fields)


def write(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/{name}", "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


for name, text in {
    "connect-v4": "CONNECT 10.0.0.7:8080",
    "connect-v6": "CONNECT [fd00::7]:8080",
    "connect-host": "CONNECT reviews.demo:8080",
    "get": "GET http://10.0.0.7:8080/",
}.items():
    write("hbone_connect", name, text)

port = message(field(1, 80), field(2, 8080))
workload = message(
    field(20, "demo/pod-1"), field(1, "pod-1"), field(2, "demo"), field(3, bytes([10, 0, 0, 7])),
    field(7, "client"),
    # services: map<string, PortList> = 22, an entry is {key = 1, value = 2}.
    field(22, message(field(1, "demo/reviews.demo.svc.cluster.local"), field(2, field(1, port)))),
)
service = message(field(1, "reviews"), field(2, "demo"), field(3, "reviews.demo.svc.cluster.local"), field(5, port))


def resource(name, body):
    return message(field(3, name), field(1, "1"), field(2, field(2, body)))


write("xds_state", "addresses", message(
    field(4, "type.googleapis.com/istio.workload.Address"),
    field(2, resource("demo/pod-1", field(1, workload))),
    field(2, resource("demo/reviews.demo.svc.cluster.local", field(2, service))),
    field(6, "demo/gone"),
    field(5, "1"),
))
principal = field(1, "cluster.local/ns/demo/sa/client")  # StringMatch.exact
policy = message(field(1, "allow-client"), field(2, "demo"), field(5, field(1, field(2, field(3, principal)))))
write("xds_state", "policies", message(
    field(4, "type.googleapis.com/istio.security.Authorization"),
    field(2, resource("demo/allow-client", policy)),
    field(5, "2"),
))

for name, key in {
    "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "p384-sha256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "ed25519": ["-newkey", "ed25519"],
}.items():
    der = subprocess.run(
        ["openssl", "req", "-new", "-nodes", "-keyout", "/dev/null", "-subj", "/O=demo",
         "-addext", "subjectAltName=URI:spiffe://cluster.local/ns/demo/sa/client", "-outform", "DER", *key],
        check=True, capture_output=True).stdout
    write("csr", name, der)

for file in ["policies.yaml", "waypoints.yaml", "workloads.yaml", "entries.yaml", "mtls.yaml"]:
    os.makedirs("corpus/yaml_objects", exist_ok=True)
    shutil.copy(f"../istiod-lite/tests/fixtures/{file}", f"corpus/yaml_objects/{file}")
