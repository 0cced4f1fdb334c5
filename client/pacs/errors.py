"""The failures a PACS really has: one class each, a one-line message naming the source and the fix, an exit code.

Every failure of a pull leaves the last complete mirror untouched (what was fetched so far waits in the staging
folder, so the next pull resumes): a partial dataset is never presented as complete. Messages name the source
(its URL or AE title and host) and stay on the site: they are printed by ``atoll site pull``, never sent to the
consortium. :class:`NoCompleteMirror` is the one error a round can meet; its :attr:`~NoCompleteMirror.public`
text is free of any identifier or address.
"""

from __future__ import annotations

from client.site_config import ConfigError

EXIT_OK = 0
EXIT_CONFIG = 2  # the site config or the local setup (as `atoll site check`)
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_REJECTED = 5
EXIT_NOTHING_MATCHED = 6
EXIT_INCOMPLETE = 7
EXIT_QUARANTINED = 8  # the pull completed; some retrieved objects were quarantined (not an exception)
EXIT_PROTOCOL = 9
EXIT_BUSY = 10
EXIT_NO_MIRROR = 11


class PullError(Exception):
    """A pull failed; ``str(error)`` is the one-line message ``atoll site pull`` prints."""

    exit_code = 1

    def __init__(self, source: str, problem: str, fix: str) -> None:
        super().__init__(f"{source}: {problem}; {fix}")
        self.source, self.problem, self.fix = source, problem, fix


class SourceUnreachable(PullError):
    """No connection: the server is down, refuses the connection, or the name does not resolve."""

    exit_code = EXIT_UNREACHABLE


class AuthRefused(PullError):
    """HTTP 401/403: wrong or missing credentials, or the account may not read these studies."""

    exit_code = EXIT_AUTH


class AssociationRejected(PullError):
    """The DIMSE peer rejected the association or the request (an AE title it does not know: Orthanc's default)."""

    exit_code = EXIT_REJECTED


class NothingMatched(PullError):
    """The query matched no instance. The mirror is kept: an empty answer is more often a wrong query than an
    emptied PACS, and wiping a site's dataset on a typo would be worse than keeping it."""

    exit_code = EXIT_NOTHING_MATCHED


class TransferIncomplete(PullError):
    """Fewer instances arrived than were asked for (connection cut, C-MOVE sub-operations failed)."""

    exit_code = EXIT_INCOMPLETE


class ProtocolError(PullError):
    """The PACS answered, but not as DICOMweb/DIMSE says it should (wrong URL, server error, failure status)."""

    exit_code = EXIT_PROTOCOL


class PullBusy(PullError):
    """Another ``atoll site pull`` of this site is running."""

    exit_code = EXIT_BUSY


class LocalSetupError(PullError):
    """Atoll's side cannot take part (e.g. the storage SCP cannot listen on ``move_port``)."""

    exit_code = EXIT_CONFIG


class NoCompleteMirror(ConfigError):
    """A PACS site has no complete mirror (never pulled, or a commit never finished): it cannot train.

    A ``ConfigError`` so that ``atoll site check`` reports it like any other setup problem; the ClientApp refuses
    the round with code ``NO_COMPLETE_MIRROR`` and :attr:`public` (no identifier, no address, no path).
    """

    code = "NO_COMPLETE_MIRROR"
    exit_code = EXIT_NO_MIRROR
    public = ("the site pulls its images from a PACS and has no complete mirror yet (its first pull has not "
              "succeeded); its administrator must run `atoll site pull`")
