"""The language model's feedback experiment through the one command line: the tests of
:mod:`kinds_common`."""

from kinds_common import *  # noqa: F403 - the shared tests and their fixture

KIND = "lm_feedback"
