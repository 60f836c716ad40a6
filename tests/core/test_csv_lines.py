"""``core.streaming.csv_lines``, the CSV of the streamed downloads (the audit log's export, an experiment's results):
one line a row, quoted as the csv module quotes, each made when it is read."""

from __future__ import annotations

import csv
import io

import pytest

from core.streaming import csv_lines


def test_each_row_is_one_line_quoted_as_csv_reads_it_back():
    rows = [["plain", 1, ""], ['a "quote", a comma', 2.5, "two\nlines"]]

    lines = list(csv_lines(("name", "figure", "note"), rows))

    assert lines[0] == "name,figure,note\r\n" and lines[1] == "plain,1,\r\n"
    assert len(lines) == 3
    assert list(csv.reader(io.StringIO("".join(lines)))) == [
        ["name", "figure", "note"],
        ["plain", "1", ""],
        ['a "quote", a comma', "2.5", "two\nlines"],
    ]


def test_a_line_is_made_when_it_is_read_not_before():
    def rows():
        yield ["first"]
        raise RuntimeError("the second row was read before the first line was sent")

    lines = csv_lines(("header",), rows())

    assert next(lines) == "header\r\n" and next(lines) == "first\r\n"
    with pytest.raises(RuntimeError):
        next(lines)
