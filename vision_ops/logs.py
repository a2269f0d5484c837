"""How vision-ops logs: its own loggers at the level asked, the libraries' no lower than INFO,
and every line with the credentials of any URL in it masked. The CLI sets it up in its process;
the bench in each job's fresh process."""

from __future__ import annotations

import logging

from vision_ops.storage import masked_credentials

log = logging.getLogger("vision_ops")  # the package's loggers are its children


class MaskedFormatter(logging.Formatter):
    """Log lines, tracebacks included, with the credentials of any URL in them masked
    (`storage.masked_credentials`), as the CLI's `error:` line is."""

    def format(self, record: logging.LogRecord) -> str:
        return masked_credentials(super().format(record))


# Libraries whose INFO lines say nothing a user acts on, once per client: botocore's "Found
# credentials in environment variables." came 8 to 20 times a command.
QUIET_LIBRARIES = ("botocore", "aiobotocore", "s3fs")


def log_at(level: int) -> None:
    """Our loggers at `level`; the libraries' (botocore, urllib3, Ray ...) no lower than INFO,
    whose DEBUG lines carry request headers, and QUIET_LIBRARIES' no lower than WARNING. Every
    line through MaskedFormatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(MaskedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler])  # where the process has not set up logging yet
    logging.getLogger().setLevel(max(level, logging.INFO))
    for chatty in QUIET_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    log.setLevel(level)
