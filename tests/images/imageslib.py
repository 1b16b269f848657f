"""The image suite's check list (tests/images)."""

LABEL = "jobs-images-test"


class Checks:
    """Named checks, each printed PASS/FAIL as it is made; a test fails (verify) with every
    failed check of its own, after making them all. All lines go to summary.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        line = f"{name}" + (f" -- {detail}" if detail else "")
        self.lines.append(f"{'PASS' if ok else 'FAIL'} {line}")
        print(self.lines[-1], flush=True)
        if not ok:
            self.failed.append(line)
        return ok

    def verify(self) -> None:
        failed, self.failed = self.failed, []
        assert not failed, "failed checks:\n" + "\n".join(failed)
