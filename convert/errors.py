"""The one exception the converter raises for a bad source, a bad request or a bad destination."""


class ConvertError(RuntimeError):
    """Says what was wrong, what was expected and what to do; nothing is left on disk when it is raised."""
