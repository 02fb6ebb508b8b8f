"""The one error type a user sees: a problem they can fix (bad path, flag,
checkpoint), printed as one sentence with exit code 2 and no traceback.
Dependency-free, so every module can raise it and still be copied alone."""


class UserError(Exception):
    pass
