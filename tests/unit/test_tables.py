"""flowers.tables: markdown for reports, aligned columns for the terminal."""

import pytest

from flowers.tables import markdown_table, text_table


def test_markdown_alignment_row_follows_align():
    table = markdown_table(["backend", "accuracy"], [["torch", 0.5], ["jax", 0.25]], align="lr")
    assert table.splitlines() == ["| backend | accuracy |", "| --- | ---: |", "| torch | 0.5 |",
                                  "| jax | 0.25 |"]


@pytest.mark.parametrize(("align", "rows"), [("l", [[1, 2]]), ("lx", [[1, 2]]), ("ll", [[1]])])
def test_a_ragged_table_or_bad_alignment_is_refused(align, rows):
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], rows, align=align)


def test_text_columns_are_padded_to_the_widest_cell_without_trailing_spaces():
    assert text_table([["name", "n"], ["tensorflow", 1], ["jax", 22]]).splitlines() == [
        "name        n", "tensorflow  1", "jax         22"]
