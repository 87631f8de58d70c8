"""Keeping the COCO summary table that pycocotools prints.

``COCOeval.summarize`` prints its twelve-line table (AP and AR over IoU
thresholds, object areas and detection counts) to standard output, and
MMDetection's ``CocoMetric`` returns only the first six numbers. To save
the whole table next to the results, :class:`CocoTableRecorder` copies
standard output while a test runs and keeps the table's lines, leaving what
the user sees unchanged.
"""
import io
import sys
from typing import List, TextIO

# Every line of COCOeval's summary begins with one of these.
TABLE_PREFIXES = (' Average Precision', ' Average Recall')


class _Tee(io.TextIOBase):
    """A text stream that writes to ``stream`` and remembers the text."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


class CocoTableRecorder:
    """Context manager that records the COCO tables printed inside it.

    Example:
        >>> with CocoTableRecorder() as recorder:
        ...     runner.test()
        >>> recorder.tables  # one string of twelve lines per evaluation
    """

    def __enter__(self) -> 'CocoTableRecorder':
        self._original = sys.stdout
        self._tee = _Tee(self._original)
        sys.stdout = self._tee
        return self

    def __exit__(self, *exc_info) -> None:
        sys.stdout = self._original

    @property
    def tables(self) -> List[str]:
        """Each printed table, as its lines joined by newlines."""
        tables, current = [], []
        for line in self._tee.copy.getvalue().splitlines():
            if line.startswith(TABLE_PREFIXES):
                current.append(line)
            elif current:
                tables.append('\n'.join(current))
                current = []
        if current:
            tables.append('\n'.join(current))
        return tables
