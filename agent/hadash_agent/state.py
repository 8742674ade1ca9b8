"""What the agent keeps on disk: its host token and the server's credential.

One JSON file, ``<state_dir>/state.json``, mode 0600 in a 0700 directory, replaced
atomically (write a temporary file, fsync, rename, fsync the directory), so a crash or
power loss leaves either the old credentials or the new ones, never half of each.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("hadash_agent")


@dataclass
class Credentials:
    name: str = ""  # the host name the token belongs to
    server_url: str = ""  # the server that issued it
    token: str = ""  # our host token (Authorization on everything we send)
    server_token: str = ""  # what the server presents on its calls to us
    host_id: int | None = None

    @property
    def enrolled(self) -> bool:
        return bool(self.token)


class StateStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> Credentials:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return Credentials()
        if stat.S_IMODE(info.st_mode) & 0o077:
            log.warning("state file %s is readable by others: setting mode 0600", self.path)
            os.chmod(self.path, 0o600)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read the state file {self.path}: {exc}") from None
        known = Credentials.__dataclass_fields__
        return Credentials(**{k: v for k, v in data.items() if k in known})

    def save(self, creds: Credentials) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(creds), f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
