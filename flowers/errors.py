"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""


class FlowersError(Exception):
    """A problem with what the user asked for (bad config, missing path, no network...).

    The message is one line that says what failed and what to do instead.
    """


class PeerLost(FlowersError):
    """Another process of a data-parallel run died or stopped answering.

    The CLI exits at once after printing it: the frameworks' own shutdown would wait for (and then
    abort on) the dead process.
    """
