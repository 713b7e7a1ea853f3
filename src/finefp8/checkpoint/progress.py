"""The progress bar of a conversion: bytes read, tensors done, speed and time left."""

from __future__ import annotations

__all__ = ["Progress"]


class Progress:
    """A rich progress bar on stderr when ``enabled``, else nothing.

    ``advance(nbytes, ntensors)`` adds to the counts; ``close()`` stops the bar (idempotent).
    """

    def __init__(self, enabled: bool, total_bytes: int, total_tensors: int, label: str):
        self.enabled = enabled
        self.tensors, self.total_tensors = 0, total_tensors
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                       TextColumn("{task.fields[tensors]} tensors"), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.bar.add_task(label, total=total_bytes, tensors=f"0/{total_tensors}")
        self.bar.start()

    def advance(self, nbytes: int, ntensors: int) -> None:
        """Count ``nbytes`` more bytes read and ``ntensors`` more tensors done."""
        self.tensors += ntensors
        if self.enabled:
            self.bar.update(self.task, advance=nbytes,
                            tensors=f"{self.tensors}/{self.total_tensors}")

    def close(self) -> None:
        """Stop the bar."""
        if self.enabled:
            self.bar.stop()
            self.enabled = False
