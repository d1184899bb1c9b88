"""Reading the next case of a batch ahead, in a background thread."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from medseg.inference.inputs import InputCase, case_sha256


class ReadAhead:
    """Reads the next case's files in a background thread while the current case is segmented.

    What it does with them is the input checksum every record carries, which needs every byte anyway; the
    read also leaves the files in the OS page cache, so the case's own load (gunzip, DICOM decoding) no longer
    waits for the disk or a network share. Nothing is decoded here and nothing is held in process memory
    (memory-bounded mode keeps its one-scan budget), and no Python warnings can come from this thread (the
    per-case warning capture is process-wide). hashlib and file reads release the GIL, so this overlaps the
    network's work. A read error surfaces for its own case, when the checksum is asked for.
    """

    def __init__(self, cases: list[InputCase], enabled: bool = True) -> None:
        self.cases = cases
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-read-ahead") if enabled else None
        self.next: Future | None = self._submit(0)

    def _submit(self, i: int) -> Future | None:
        return self.pool.submit(case_sha256, self.cases[i]) if self.pool is not None and i < len(self.cases) else None

    def take(self, i: int) -> Future | None:
        """The checksum of case ``i`` being computed (None when off); starts reading case ``i + 1``."""
        current, self.next = self.next, self._submit(i + 1)
        return current

    def close(self) -> None:
        """Stop reading ahead (a pending read is cancelled or awaited)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
