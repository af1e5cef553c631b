"""A real systemd to run the shipped unit under: /work/shared/systemd-box, driven from the host.

``/work/shared/systemd-box/up.sh`` boots a Debian 12 systemd 252 as PID 1 of
a ``systemd-nspawn`` container whose root is a plain directory on the host.
This module boots it (with the checkout bind-mounted read-only at
``/opt/ihld-src``), installs ihld the way ``systemd/README.md`` says (a
user ``ihld``, a venv in ``/opt/ihld/.venv`` built by pip inside the box,
``/etc/ihld/ihld.toml``, the shipped unit), and runs ``systemctl`` and
``journalctl`` in it through ``nsenter``. The spool is
``<rootfs>/var/lib/ihld`` seen from the host, so the tests drop jobs and read
results from outside, as a user of the machine would.

Anything that stops the box from starting (not root, no systemd-nspawn and
no way to install it, no registry for pip) raises ``BoxUnavailable`` with the
reason; the tests turn that into a skip.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ihld.core.storeview import count_jobs

REPO = Path(__file__).resolve().parent.parent
BOX_TOOLS = Path(os.environ.get("IHLD_SYSBOX_TOOLS", "/work/shared/systemd-box"))
MACHINE = os.environ.get("IHLD_SYSBOX_MACHINE", "ihldtest")
SRC = "/opt/ihld-src"  # the checkout, bind-mounted read-only


class BoxUnavailable(Exception):
    """The box cannot be used here; the message says why (a skip reason)."""


def _default_dir() -> Path:
    """A directory with a bootstrapped rootfs if one exists (saves ~60 s), else up.sh's default."""
    explicit = os.environ.get("IHLD_SYSBOX_DIR")
    if explicit:
        return Path(explicit)
    for candidate in (Path("/var/tmp/ihld-sysbox-unit"), Path("/var/tmp/ihld-systemd-box")):
        if (candidate / "root" / "lib" / "systemd" / "systemd").exists():
            return candidate
    return Path("/var/tmp/ihld-systemd-box")


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


@dataclass
class Box:
    sysd_dir: Path
    machine: str = MACHINE

    @property
    def root(self) -> Path:
        return self.sysd_dir / "root"

    @property
    def spool(self) -> Path:
        return self.root / "var" / "lib" / "ihld"

    @property
    def leader(self) -> int:
        pid = _alive(self.sysd_dir / f"{self.machine}.leader.pid")
        if pid is None:
            raise BoxUnavailable(f"container {self.machine} is not running")
        return pid

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def boot(cls) -> Box:
        if os.geteuid() != 0:
            raise BoxUnavailable("the systemd box needs root (systemd-nspawn, nsenter)")
        up = BOX_TOOLS / "up.sh"
        if not up.exists():
            raise BoxUnavailable(f"{up} not found")
        box = cls(_default_dir())
        # another machine booted on the same rootfs would share /var/lib/ihld: refuse
        for pid_file in box.sysd_dir.glob("*.nspawn.pid"):
            if pid_file.name != f"{box.machine}.nspawn.pid" and _alive(pid_file):
                raise BoxUnavailable(f"another container runs on {box.root} ({pid_file.name})")
        if _alive(box.sysd_dir / f"{box.machine}.nspawn.pid") and not box._has_source():
            box.down()  # running, but without the checkout bound in: boot it again
        env = {
            **os.environ,
            "SYSD_DIR": str(box.sysd_dir),
            "MACHINE": box.machine,
            "NSPAWN_ARGS": f"--bind-ro={REPO}:{SRC}",
        }
        try:
            proc = subprocess.run(
                [str(up)], env=env, capture_output=True, text=True, timeout=900
            )
        except subprocess.TimeoutExpired:
            raise BoxUnavailable("up.sh did not finish within 15 minutes") from None
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
            raise BoxUnavailable("up.sh failed: " + " | ".join(tail))
        if not box._has_source():
            raise BoxUnavailable(f"the checkout is not visible at {SRC} inside the box")
        return box

    def down(self) -> None:
        env = {**os.environ, "SYSD_DIR": str(self.sysd_dir), "MACHINE": self.machine}
        subprocess.run([str(BOX_TOOLS / "down.sh")], env=env, capture_output=True, timeout=120)

    def _has_source(self) -> bool:
        try:
            return self.run("test", "-f", f"{SRC}/pyproject.toml", check=False).returncode == 0
        except BoxUnavailable:
            return False

    # -- running things inside -----------------------------------------------------------------

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the box: {shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def sh(self, script: str, *, check: bool = True, timeout: float = 600.0) -> str:
        return self.run("/bin/bash", "-c", script, check=check, timeout=timeout).stdout

    def systemctl(self, *args: str, check: bool = True, timeout: float = 150.0) -> str:
        return self.run("systemctl", *args, check=check, timeout=timeout).stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "ihld", *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """A journal position: later ``journal(after=...)`` shows only what came after."""
        out = self.run("journalctl", "-u", "ihld", "-n", "0", "--show-cursor", "--no-pager").stdout
        for line in out.splitlines():
            if line.startswith("-- cursor: "):
                return line[len("-- cursor: ") :]
        return ""

    def journal(self, after: str = "", *, output: str = "cat") -> list[str]:
        args = ["journalctl", "-u", "ihld", "-o", output, "--no-pager"]
        if after:
            args.append(f"--after-cursor={after}")
        return self.run(*args).stdout.splitlines()

    def events(self, after: str = "") -> list[dict[str, Any]]:
        """The daemon's JSON events in the journal (its other lines are skipped)."""
        out = []
        for line in self.journal(after):
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_journal(self, text: str, after: str, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.journal(after)
            if any(text in line for line in lines):
                return lines
            time.sleep(0.3)
        raise AssertionError(f"{text!r} not in the journal: {self.journal(after)[-30:]}")

    # -- ihld ------------------------------------------------------------------------------------

    def install(self, sim_port: int) -> None:
        """ihld as systemd/README.md installs it, from the bind-mounted checkout."""
        pip_env = self._pip_trust()
        script = f"""
set -euo pipefail
id ihld >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/ihld \\
    --no-create-home --shell /usr/sbin/nologin ihld
mkdir -p /opt/ihld
find /opt/ihld -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +
tar -C {SRC} --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' \\
    --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \\
    --exclude=./.hypothesis -cf - . | tar -C /opt/ihld -xf -
[ -x /opt/ihld/.venv/bin/pip ] || python3 -m venv /opt/ihld/.venv
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root {pip_env} \
    /opt/ihld/.venv/bin/pip install --quiet --disable-pip-version-check /opt/ihld
/opt/ihld/.venv/bin/python -m compileall -q /opt/ihld/plugins
/opt/ihld/.venv/bin/python -c 'import ihld.service.daemon'   # the installed tree imports
install -d -o root -g ihld -m 0750 /etc/ihld
install -m 0644 /opt/ihld/systemd/ihld.service /etc/systemd/system/ihld.service
rm -rf /etc/systemd/system/ihld.service.d
systemctl daemon-reload
"""
        try:
            self.sh(script, timeout=900)
        except AssertionError as exc:
            if "pip" in str(exc) or "Could not" in str(exc):
                raise BoxUnavailable(f"pip could not install ihld in the box: {exc}") from None
            raise
        self.write_config(sim_port)

    def _pip_trust(self) -> str:
        """The host's CA bundle for pip in the box (the registry may sit behind a TLS proxy).

        Only pip inside the box uses it (``PIP_CERT``); the box's own trust store is
        left alone. Nothing else of the host's environment is passed on.
        """
        bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
        if not bundle.is_file():
            return ""
        target = self.root / "etc" / "ihld-test-host-ca.pem"
        target.write_bytes(bundle.read_bytes())
        return "PIP_CERT=/etc/ihld-test-host-ca.pem"

    def config_text(self, sim_port: int, extra: str = "") -> str:
        return (
            '[spool]\ndir = "/var/lib/ihld"\nsettle_s = 0.2\nrescan_s = 0.5\n\n'
            f'[[backends]]\nname = "sim"\nurl = "http://127.0.0.1:{sim_port}"\nslots = 2\n'
            "max_loaded = 1\nconnect_timeout_s = 2\nread_timeout_s = 10\n\n"
            '[plugins]\ndirs = ["/opt/ihld/plugins"]\nentry_points = false\n\n'
            "[limits]\nretry_backoff_s = 0.1\n\n[control]\ngrace_s = 20\n\n"
            f"{extra}"
        )

    def write_config(self, sim_port: int, extra: str = "", *, text: str | None = None) -> None:
        path = self.root / "etc" / "ihld" / "ihld.toml"
        tmp = path.with_name(".ihld.toml.tmp")
        tmp.write_text(text if text is not None else self.config_text(sim_port, extra))
        os.chmod(tmp, 0o640)
        gid = self._gid("ihld")
        os.chown(tmp, 0, gid)
        tmp.rename(path)

    def _gid(self, group: str) -> int:
        for line in (self.root / "etc" / "group").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == group:
                return int(parts[2])
        raise AssertionError(f"no group {group} in the box")

    def drop_in(self, name: str, text: str | None) -> None:
        """Write (or with None remove) ``/etc/systemd/system/ihld.service.d/<name>.conf``."""
        directory = self.root / "etc" / "systemd" / "system" / "ihld.service.d"
        path = directory / f"{name}.conf"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            directory.mkdir(exist_ok=True)
            path.write_text(text)
        self.systemctl("daemon-reload")

    def reset(self) -> None:
        """Stopped, not failed, no drop-ins, an empty spool."""
        self.systemctl("stop", "ihld", check=False)
        self.systemctl("reset-failed", "ihld", check=False)
        self.drop_in("test", None)
        self.sh("rm -rf /var/lib/ihld")

    # -- the spool, from the host ----------------------------------------------------------------

    def drop(self, name: str, text: str) -> None:
        """Drop a job file as a user would (a dotted temp file, then a rename)."""
        inbox = self.spool / "inbox"
        tmp = inbox / f".{name}.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o640)  # readable through the group (the inbox is setgid ihld)
        tmp.rename(inbox / name)

    def outcomes(self) -> tuple[set[str], set[str]]:
        def names(directory: str) -> set[str]:
            try:
                return {p.stem for p in (self.spool / directory).glob("*.json")}
            except FileNotFoundError:
                return set()

        return names("outbox"), names("failed")

    def wait_outcomes(self, count: int, timeout: float = 120.0) -> tuple[set[str], set[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, failed = self.outcomes()
            if len(done) + len(failed) >= count:
                return done, failed
            time.sleep(0.2)
        raise AssertionError(
            f"{len(done)}+{len(failed)} of {count} finished; journal: {self.journal()[-30:]}"
        )

    def checkpoints(self) -> int:
        return count_jobs(self.spool / "work" / "queue.db")
