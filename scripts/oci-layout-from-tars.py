#!/usr/bin/env python3
"""Writes an OCI image layout from uncompressed layer tars (gzip-compressed
here, or kept as they are with LAYER_COMPRESSION=none).

usage: oci-layout-from-tars.py OUT_DIR TAG LAYER.tar...
"""
import gzip
import hashlib
import json
import os
import shutil
import sys


def put_blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def main():
    out, tag, tars = sys.argv[1], sys.argv[2], sys.argv[3:]
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "blobs", "sha256"))
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers, diff_ids = [], []
    for path in tars:
        with open(path, "rb") as f:
            raw = f.read()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        if os.environ.get("LAYER_COMPRESSION") == "none":
            digest, size = put_blob(out, raw)
            media = "application/vnd.oci.image.layer.v1.tar"
        else:
            digest, size = put_blob(out, gzip.compress(raw, compresslevel=6, mtime=0))
            media = "application/vnd.oci.image.layer.v1.tar+gzip"
        layers.append({"mediaType": media, "digest": digest, "size": size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdigest, csize = put_blob(out, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": layers,
    }
    mdigest, msize = put_blob(out, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)


if __name__ == "__main__":
    main()
