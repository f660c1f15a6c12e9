"""One Ray auth token per test process.

Ray caches parts of its auth setup per process: a second local cluster started in the same
process with a different token fails to start its GCS (InvalidAuthToken, seen as "Failed to
start GCS"). Each test cluster keeps its own FLEET_HOME, but with the token the process
already uses: same value, new file.
"""

import os
from pathlib import Path


def share_token(home: Path) -> None:
    prev = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not prev or not Path(prev).is_file():
        return
    dest = home / "ray-auth-token"  # launcher.local's per-home token file
    if dest.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(Path(prev).read_text())
