"""ORAS (the oras-py SDK) against berth: an artifact pushed in 64 KiB chunks,
a signature pushed with that artifact as its subject and found through the
referrers API, and the artifact pulled back byte for byte.

Usage: python3 tests/oras_round_trip.py HOST:PORT WORKDIR (run by tests/clients.rs
and docker/e2e-tls.sh). With ORAS_USER and ORAS_PASSWORD set it speaks HTTPS,
trusting the CA in REQUESTS_CA_BUNDLE, and logs in; it then also checks that
the same calls without credentials are refused with 401.
"""
import os
import sys

import oras.client
import oras.oci
import requests

reg, work = sys.argv[1], sys.argv[2]
user, password = os.environ.get("ORAS_USER"), os.environ.get("ORAS_PASSWORD")
secure = bool(user)
scheme = "https" if secure else "http"
auth = (user, password) if secure else None
os.chdir(work)
with open("art.bin", "wb") as f:
    f.write(bytes((i * 11) % 256 for i in range(300_000)))
with open("sig.txt", "w") as f:
    f.write("signature\n")

c = oras.client.OrasClient(hostname=reg, insecure=not secure, auth_backend="basic" if secure else "token")
if secure:
    # Without credentials an upload is refused with a Basic challenge.
    anon = requests.post(f"{scheme}://{reg}/v2/oras/art/blobs/uploads/")
    assert anon.status_code == 401 and anon.headers["WWW-Authenticate"].startswith("Basic"), anon.headers
    c.login(username=user, password=password, hostname=reg, config_path=os.path.join(work, "auth.json"))
r = c.push(target=f"{reg}/oras/art:v1", files=["art.bin"], do_chunked=True, chunk_size=65536, quiet=True)
assert r.status_code == 201, r.status_code

accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
resp = requests.head(f"{scheme}://{reg}/v2/oras/art/manifests/v1", headers=accept, auth=auth)
assert resp.status_code == 200, resp.status_code
digest, size = resp.headers["Docker-Content-Digest"], int(resp.headers["Content-Length"])
media_type = resp.headers["Content-Type"]
subject = oras.oci.Subject(mediaType=media_type, digest=digest, size=size)
r = c.push(target=f"{reg}/oras/art:sig", files=["sig.txt"], subject=subject, quiet=True)
assert r.status_code == 201, r.status_code

resp = requests.get(f"{scheme}://{reg}/v2/oras/art/referrers/{digest}", auth=auth)
assert resp.status_code == 200, resp.status_code
referrers = resp.json()["manifests"]
assert len(referrers) == 1, referrers
if secure:
    anon = requests.get(f"{scheme}://{reg}/v2/oras/art/referrers/{digest}")
    assert anon.status_code == 401, anon.status_code

os.makedirs("out")
pulled = c.pull(target=f"{reg}/oras/art:v1", outdir="out")
assert len(pulled) == 1 and open(pulled[0], "rb").read() == open("art.bin", "rb").read(), pulled
print(f"oras ({scheme}{', logged in' if secure else ''}): chunked push, subject + referrers, pull: ok")
