"""ORAS (the oras-py SDK) against berth: an artifact pushed in 64 KiB chunks,
a signature pushed with that artifact as its subject and found through the
referrers API, and the artifact pulled back byte for byte.

Usage: python3 tests/oras_round_trip.py HOST:PORT WORKDIR (run by tests/clients.rs)
"""
import json
import os
import sys
import urllib.request

import oras.client
import oras.oci

reg, work = sys.argv[1], sys.argv[2]
os.chdir(work)
with open("art.bin", "wb") as f:
    f.write(bytes((i * 11) % 256 for i in range(300_000)))
with open("sig.txt", "w") as f:
    f.write("signature\n")

c = oras.client.OrasClient(hostname=reg, insecure=True)
r = c.push(target=f"{reg}/oras/art:v1", files=["art.bin"], do_chunked=True, chunk_size=65536, quiet=True)
assert r.status_code == 201, r.status_code

req = urllib.request.Request(f"http://{reg}/v2/oras/art/manifests/v1", method="HEAD",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
with urllib.request.urlopen(req) as resp:
    digest, size = resp.headers["Docker-Content-Digest"], int(resp.headers["Content-Length"])
    media_type = resp.headers["Content-Type"]
subject = oras.oci.Subject(mediaType=media_type, digest=digest, size=size)
r = c.push(target=f"{reg}/oras/art:sig", files=["sig.txt"], subject=subject, quiet=True)
assert r.status_code == 201, r.status_code

with urllib.request.urlopen(f"http://{reg}/v2/oras/art/referrers/{digest}") as resp:
    referrers = json.load(resp)["manifests"]
assert len(referrers) == 1, referrers

os.makedirs("out")
pulled = c.pull(target=f"{reg}/oras/art:v1", outdir="out")
assert len(pulled) == 1 and open(pulled[0], "rb").read() == open("art.bin", "rb").read(), pulled
print("oras: chunked push, subject + referrers, pull: ok")
