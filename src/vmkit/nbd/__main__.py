"""``python -m vmkit.nbd serve ...``: the ``vmkit nbd`` commands without the main CLI."""

import sys

from vmkit.cli.nbd import app
from vmkit.errors import ExitCode, VmkitError


def main() -> None:
    try:
        app(prog_name="vmkit nbd")
    except VmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))


if __name__ == "__main__":
    main()
