"""The one error class for bad dataset input, and a helper that collects row errors into one report.

Every problem found while loading a dataset is a :class:`DataError` naming the file (relative to where the user
pointed, never an absolute path of the machine), the row and the field. Loaders check every row before any LM
call and raise a single error listing the first few problems with a total count.
"""

from __future__ import annotations

from collections.abc import Sequence

HEADER_ROW = 0
"""Row number used for problems in a CSV header (data rows are numbered from 1)."""

MAX_ERRORS_SHOWN = 10


class DataError(ValueError):
    """Bad dataset input: a missing or broken image, a label outside the task's space, a missing column, ...

    Rows are numbered from 1 in file order (the CSV header is not counted and is reported as row 0; blank JSONL
    lines are not counted). The field is the column (or key) name in the source data, so the user can find it.

    Attributes:
        file: The data file, relative to where the user pointed (for example ``labels.csv`` or ``cat/x.png``).
        row: 1-based data row number, or 0 for the header / the file as a whole.
        field: The column or key the problem is in, or ``None`` when it concerns the whole row.
        problem: What is wrong, in one sentence.
        errors: For a collected report, every individual error (the first one also sets file, row and field).
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str,
        row: int,
        field: str | None,
        errors: Sequence[DataError] = (),
    ) -> None:
        self.problem = problem
        self.file = file
        self.row = row
        self.field = field
        self.errors: tuple[DataError, ...] = tuple(errors) or (self,)
        super().__init__(problem if errors else self.location() + ": " + problem)

    def location(self) -> str:
        """``file, row N, field 'x'`` as used at the start of the message."""
        row = "header (row 0)" if self.row == HEADER_ROW else f"row {self.row}"
        field = f"field '{self.field}'" if self.field is not None else "field (whole row)"
        return f"{self.file}, {row}, {field}"

    @classmethod
    def collected(cls, errors: Sequence[DataError], *, total_rows: int | None = None) -> DataError:
        """One error listing the first few of ``errors`` and how many there are in total.

        Args:
            errors: Individual row errors, in file order; at least one.
            total_rows: Number of rows checked, shown in the summary when given.

        Returns:
            A ``DataError`` whose ``file``/``row``/``field`` are those of the first error and whose ``errors``
            holds all of them.
        """
        if not errors:
            raise ValueError("no errors to report")
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        files = sorted({e.file for e in errors})
        where = files[0] if len(files) == 1 else f"{len(files)} files"
        checked = f" of {total_rows} rows" if total_rows is not None else ""
        shown = errors[:MAX_ERRORS_SHOWN]
        lines = [f"{len(errors)} problems in {where}{checked} (showing the first {len(shown)}):"]
        lines += [f"  - {e}" for e in shown]
        if len(errors) > len(shown):
            lines.append(f"  ... and {len(errors) - len(shown)} more")
        return cls("\n".join(lines), file=first.file, row=first.row, field=first.field, errors=errors)
