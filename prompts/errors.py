"""Errors of the core, each carrying a message a user can act on."""


class RankoneError(ValueError):
    """Base class: a bad artifact, a bad shape, a backbone that does not fit."""


class ArtifactError(RankoneError):
    """A blob or file is not a valid rankone artifact (corrupt, wrong kind, bad shape, ...)."""


class BackboneMismatchError(ArtifactError):
    """An artifact was trained on another backbone than the one it is used with."""


class InvalidNameError(ArtifactError):
    """A task name or shared-prompt id that breaks the naming rule (``check_name``)."""
