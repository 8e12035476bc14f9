"""What every entry point shares on the command line: flag parsing that reports a bad flag or a
bad ``--config`` override in one ``error:`` line (exit 2), and the exit codes.

    app.run(main, flags_parser=cli.parse_flags)

Exit codes: 0 done (or stopped by a signal and saved), 2 bad input (flags, config, data, a
workdir in use or holding another run), 3 too many non-finite steps, 4 an output could not be
written (full disk, read-only filesystem, permissions).
"""

import re
import sys

from absl import flags

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_WRITE_FAILED = 4


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Prints ``error: message`` (one line) to stderr and exits with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_overrides(argv):
    return [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]


def parse_flags(argv):
    """absl's flag parsing, with every failure turned into one ``error:`` line and exit code 2:
    an unknown flag, a value of the wrong type, an override of a config key that does not exist
    (``--config.train.foo=1``), or a config file that cannot be loaded."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing nested key
        missing = str(e).strip("\"'").strip("\"'")
        culprits = [o for o in _config_overrides(argv) if missing in o.split(".")]
        where = f"--{culprits[0]}: " if culprits else ""
        fail(f"{where}the config has no key {missing!r} (check the spelling; see the config file for its keys)")
    except flags.Error as e:
        text = str(e).strip()
        unknown = re.match(r"Unknown command line flag '(config\.[^']+)'", text)
        if unknown:
            fail(f"--{unknown.group(1)}: the config has no such key (check the spelling; see the config file for its keys)")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Error whilst parsing config file" in text:  # the file's own exception is the last line
            fail(f"{lines[0].split(':')[0]}: cannot load the config file: {lines[-1]}")
        fail(lines[0] if lines else type(e).__name__)
