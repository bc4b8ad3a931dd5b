"""The page A lends the save kernel for its answer (the format: kjumpd.answer).

One locked page of the daemon, holding a blank record with a nonce of this hibernation; the
job names its physical address (``Job.answer``). Before each jump it is blanked again (a
parked save kernel that refused the job may have answered already) and located again: if
the kernel moved it since the job was made, B's write, if any, lands in the old frame, and
:meth:`AnswerPage.read` reports nothing rather than an answer it cannot see.
"""

from __future__ import annotations

import logging
import os

from kjumpd import answer
from kjumpd.errors import KjumpError
from kjumpd.linux.pagemap import PAGEMAP, LockedPages
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)


class AnswerPage(LockedPages):
    """KexecError (from LockedPages) when the page cannot be locked or located."""

    def __init__(self, sysroot: Sysroot) -> None:
        self.nonce = os.urandom(answer.NONCE_SIZE)
        super().__init__(
            answer.blank(self.nonce),
            "the save kernel's answer page",
            fix="kjumpd needs CAP_IPC_LOCK and CAP_SYS_ADMIN; without the page a save "
            "kernel that cannot save says why on its console only",
            pagemap=str(sysroot.path(PAGEMAP)),
        )
        self.phys = self.frames()[0] * answer.PAGE
        self.moved = False

    def job_field(self) -> tuple[int, str]:
        """``Job.answer``: where B writes, and the nonce it must find there."""
        return (self.phys, self.nonce.hex())

    def reset(self) -> None:
        """Right before a jump: blank, and still where the job says."""
        self.map[: answer.PAGE] = answer.blank(self.nonce)
        try:
            self.moved = self.frames()[0] * answer.PAGE != self.phys
        except KjumpError as e:  # a page not located is a page not trusted
            log.info("the save kernel's answer page is not located again (%s)", e.message)
            self.moved = True
        if self.moved:
            log.info("the save kernel's answer page moved since the job was made: not read")

    def read(self) -> answer.Answer | None:
        """B's answer, once the jump came back (None: none, or the page moved)."""
        if self.moved or self.map.closed:
            return None
        return answer.read(bytes(self.map[: answer.PAGE]), self.nonce)
