"""Tests of core_model.data: readers, error reporting, vocabularies, leave-one-out.

Unit tests write tiny files into ``tmp_path``; tests marked ``realdata`` read the shared data
sets (skipped with a reason when they are absent).
"""

from __future__ import annotations

import contextlib
import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_model.data import (
    DATASET_KINDS,
    OTHER_REGION,
    PAD,
    DataError,
    InteractionLog,
    LoadReport,
    Vocabulary,
    leave_one_out,
    load_dataset,
    read_interactions,
    read_movielens_100k,
    read_movielens_1m,
    read_sasrec_pairs,
    read_twitch,
    region_of_zip,
)


@contextlib.contextmanager
def data_error(path: Path, line: int, *fragments: str) -> Iterator[None]:
    """Expect a DataError whose message names ``path`` and ``line`` (and ``fragments``)."""
    with pytest.raises(DataError) as info:
        yield
    err = info.value
    message = str(err)
    assert Path(path).name in message, message
    assert message.startswith(f"{path}:{line}: "), message
    assert err.line == line and err.path == str(path)
    for fragment in fragments:
        assert fragment in message, message


def write(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def seqs(log: InteractionLog) -> list[list[int]]:
    return [s.tolist() for s in log.sequences]


def raw_seqs(log: InteractionLog) -> list[list[str]]:
    return [[log.items.raw(i) for i in s] for s in log.sequences]


# -- Vocabulary, LoadReport, leave-one-out -----------------------------------------------------


def test_vocabulary_round_trip_and_lookup():
    vocab = Vocabulary(("a", "b", "c"), offset=1)
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again == vocab and again.ids == ("a", "b", "c") and again.offset == 1
    assert [again.index(x) for x in "abc"] == [1, 2, 3]
    assert again.raw(3) == "c" and "b" in again and "z" not in again
    with pytest.raises(KeyError, match="'z'"):
        again.index("z")
    with pytest.raises(IndexError):
        again.raw(PAD)


def test_vocabulary_coerces_ids_to_str_and_rejects_duplicates():
    vocab = Vocabulary([3, 1], offset=0)  # type: ignore[arg-type]
    assert vocab.ids == ("3", "1") and vocab.index(1) == 1
    with pytest.raises(ValueError, match="'x' appears more than once"):
        Vocabulary(("x", "y", "x"))
    with pytest.raises(ValueError, match="offset"):
        Vocabulary(("x",), offset=2)


def test_leave_one_out_hand_example():
    log = InteractionLog(
        name="hand", sequences=[np.array([1, 2, 3, 4, 5]), np.array([2, 3])],
        items=Vocabulary(tuple("abcde"), offset=1), users=Vocabulary(("u", "v")),
        report=LoadReport("hand"))
    split = leave_one_out(log)
    assert len(split) == 1 and split.removed_short_users == 1
    assert split.train[0].tolist() == [1, 2, 3]
    assert split.valid_targets.tolist() == [4] and split.test_targets.tolist() == [5]
    assert split.user_index.tolist() == [0]
    assert split.test_inputs()[0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="min_length"):
        leave_one_out(log, min_length=2)


# -- read_sasrec_pairs -------------------------------------------------------------------------


def test_sasrec_pairs_reads_file_order_and_numeric_indices(tmp_path):
    path = write(tmp_path / "pairs.txt", "1 10\n1 2\n1 10\n2 2\n2 3\n10 3\n")
    log = read_sasrec_pairs(path)
    assert log.users.ids == ("1", "2", "10") and log.items.ids == ("2", "3", "10")
    assert raw_seqs(log) == [["10", "2", "10"], ["2", "3"], ["3"]]
    assert seqs(log) == [[3, 1, 3], [1, 2], [2]]
    assert log.report.rows_read == 6 and log.report.removed == {}
    assert log.name == "pairs.txt" and log.timestamps is None


def test_sasrec_pairs_item_k_is_index_k_for_contiguous_ids(tmp_path):
    path = write(tmp_path / "pairs.txt.gz", "1 3\n1 1\n2 2\n2 3\n")
    log = read_sasrec_pairs(path)
    assert all(log.items.index(k) == k for k in (1, 2, 3))
    assert seqs(log) == [[3, 1], [2, 3]]
    assert any("item index == SASRec id" in n for n in log.report.notes)


def test_sasrec_pairs_trailing_blank_lines_counted_crlf_accepted(tmp_path):
    path = write(tmp_path / "pairs.txt", "1 1\r\n1 2\r\n\r\n\r\n")
    log = read_sasrec_pairs(path)
    assert seqs(log) == [[1, 2]]
    assert log.report.removed == {"blank lines at the end of pairs.txt": 2}


def test_sasrec_pairs_interleaved_users_grouped_with_note(tmp_path):
    log = read_sasrec_pairs(write(tmp_path / "p.txt", "1 1\n2 2\n1 3\n"))
    assert seqs(log) == [[1, 3], [2]]
    assert any("not contiguous" in n for n in log.report.notes)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("1 1\n1 2 3\n2 1\n", 2, "expected 2 whitespace-separated fields"),
    ("1 1\n1\n", 2, "expected 2 whitespace-separated fields"),
    ("1 1\n2 1\nx 2\n", 3, "user must be a non-negative integer, got 'x'"),
    ("1 1\n1 2.0\n", 2, "item must be a non-negative integer"),
    ("1 1\n1 -2\n", 2, "item must be a non-negative integer"),
    ("1 1\n\n1 2\n", 2, "blank line"),
    ("\n1 1\n", 1, "blank line"),
])
def test_sasrec_pairs_bad_lines(tmp_path, text, line, fragment):
    path = write(tmp_path / "bad.txt", text)
    with data_error(path, line, fragment, "expected" if "blank" in fragment else ""):
        read_sasrec_pairs(path)


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("empty.txt", b"", "file is empty"),
    ("spaces.txt", b"  \n\n", "file is empty"),
    ("broken.txt.gz", b"not gzip at all", "cannot read"),
])
def test_sasrec_pairs_whole_file_problems(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with data_error(path, 0, fragment):
        read_sasrec_pairs(path)


def test_sasrec_pairs_missing_file_and_bad_encoding(tmp_path):
    with data_error(tmp_path / "nope.txt", 0, "file not found"):
        read_sasrec_pairs(tmp_path / "nope.txt")
    path = tmp_path / "latin.txt"
    path.write_bytes(b"1 1\n1 2\n1 \xe9\n")
    with data_error(path, 3, "utf-8"):
        read_sasrec_pairs(path)


# -- read_interactions -------------------------------------------------------------------------


def test_interactions_csv_file_order_and_string_ids(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,extra\nbob,x,1\nann,y,2\nbob,w,3\n ann , x ,4\n")
    log = read_interactions(path)
    assert log.users.ids == ("ann", "bob") and log.items.ids == ("w", "x", "y")
    assert raw_seqs(log) == [["y", "x"], ["x", "w"]]
    assert log.timestamps is None and log.events is None and log.interaction_groups is None
    assert log.report.rows_read == 4


def test_interactions_timestamp_sort_is_stable(tmp_path):
    rows = ["u,i,t", "a,1,5", "a,2,3", "b,3,1", "a,3,3", "a,4,1.5", "a,5,5", "a,6,3"]
    log = read_interactions(write(tmp_path / "t.csv", "\n".join(rows) + "\n"), user_col="u",
                            item_col="i", timestamp_col="t")
    assert raw_seqs(log) == [["4", "2", "3", "6", "1", "5"], ["3"]]
    assert log.timestamps[0].tolist() == [1.5, 3, 3, 3, 5, 5]
    assert log.timestamps[0].dtype == np.float64


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=30))
def test_interactions_sort_matches_stable_python_sort(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("prop") / "p.csv"
    write(path, "user,item,ts\n" + "".join(f"u{u},{k},{t}\n" for k, (u, t) in enumerate(rows)))
    log = read_interactions(path, timestamp_col="ts")
    for u, raw_user in enumerate(log.users.ids):
        expected = sorted((t, k) for k, (uu, t) in enumerate(rows) if f"u{uu}" == raw_user)
        assert [int(log.items.raw(i)) for i in log.sequences[u]] == [k for _, k in expected]


def test_interactions_events_groups_and_user_attributes(tmp_path):
    path = write(tmp_path / "e.tsv.gz",
                 "user\titem\tevent\tshop\tregion\n"
                 "1\ti1\tview\ts1\tnorth\n2\ti2\tbuy\ts2\tsouth\n1\ti2\tbuy\ts2\tnorth\n")
    log = read_interactions(path, event_col="event", group_col="shop",
                            user_attribute_cols=["region"])
    assert log.event_names == ("buy", "view")
    assert [e.tolist() for e in log.events] == [[1, 0], [0]]
    assert [g.tolist() for g in log.interaction_groups] == [["s1", "s2"], ["s2"]]
    assert log.user_attributes["region"].tolist() == ["north", "south"]
    ordered = read_interactions(path, event_col="event", event_names=("view", "click", "buy"))
    assert ordered.event_names == ("view", "click", "buy")
    assert [e.tolist() for e in ordered.events] == [[0, 2], [2]]
    with data_error(path, 3, "unknown event 'buy'", "expected one of"):
        read_interactions(path, event_col="event", event_names=("view",))


def test_interactions_user_attribute_must_be_constant(tmp_path):
    path = write(tmp_path / "a.csv", "user,item,region\n1,1,n\n1,2,n\n1,3,s\n")
    with data_error(path, 4, "changes from 'n' to 's'"):
        read_interactions(path, user_attribute_cols=["region"])


def test_interactions_numeric_ids_sorted_numerically(tmp_path):
    log = read_interactions(write(tmp_path / "n.csv", "user,item\n10,10\n9,9\n10,100\n"))
    assert log.users.ids == ("9", "10") and log.items.ids == ("9", "10", "100")


def test_interactions_sep_and_file_format_override(tmp_path):
    path = write(tmp_path / "semi.data", "user;item\na;1\na;2\n")
    log = read_interactions(path, sep=";", file_format="csv")
    assert raw_seqs(log) == [["1", "2"]]
    with pytest.raises(ValueError, match="sep"):
        read_interactions(path, sep="::", file_format="csv")


def test_interactions_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "log.parquet"
    pd.DataFrame({"uid": [7, 7, 8, 7], "iid": ["a", "b", "a", "c"],
                  "ts": pd.to_datetime([3, 1, 2, 1], unit="s"),
                  "kind": ["view", "buy", "view", "view"]}).to_parquet(path)
    log = read_interactions(path, user_col="uid", item_col="iid", timestamp_col="ts",
                            event_col="kind")
    assert log.users.ids == ("7", "8")
    assert raw_seqs(log) == [["b", "c", "a"], ["a"]]
    assert log.timestamps[0].tolist() == [1.0, 1.0, 3.0]
    with data_error(path, 0, "missing columns 'user', 'item'; expected columns"):
        read_interactions(path)
    nulls = tmp_path / "nulls.pq"
    pd.DataFrame({"user": ["a", None], "item": ["x", "y"]}).to_parquet(nulls)
    with data_error(nulls, 2, "column 'user' is null"):
        read_interactions(nulls)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("user,item\na,1\na,2,3\n", 3, "expected 2 ',' -separated fields".replace(" -", "-")),
    ("user,item\na,1\nb\n", 3, "expected 2"),
    ("user,item\na,1\n,2\n", 3, "empty value in column 'user'"),
    ("user,item\n\na,1\n", 2, "blank line"),
    ("\nuser,item\na,1\n", 1, "expected the header row"),
    ('user,item\na,"1\n', 2, "malformed CSV row"),
])
def test_interactions_bad_rows(tmp_path, text, line, fragment):
    path = write(tmp_path / "bad.csv", text)
    with data_error(path, line, fragment):
        read_interactions(path)


@pytest.mark.parametrize(("value", "line"), [("soon", 3), ("nan", 3), ("", 3)])
def test_interactions_timestamp_must_be_numeric(tmp_path, value, line):
    path = write(tmp_path / "ts.csv", f"user,item,ts\na,1,1\na,2,{value}\n")
    with data_error(path, line, "column 'ts' must be a finite number"):
        read_interactions(path, timestamp_col="ts")


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("missing_col.csv", "user,thing\na,1\n",
     "missing column 'item'; expected columns ['user', 'item'], the header has"),
    ("empty.csv", "", "file is empty"),
    ("header_only.csv", "user,item\n", "no data rows"),
    ("log.json", "{}", "cannot tell the format from the extension '.json'"),
    ("log.parquet.gz", "x", "cannot tell the format from the extension '.parquet.gz'"),
])
def test_interactions_whole_file_problems(tmp_path, name, text, fragment):
    path = write(tmp_path / name, text)
    with data_error(path, 0, fragment, "expected"):
        read_interactions(path)


def test_interactions_missing_file_unknown_format_duplicate_header(tmp_path):
    with data_error(tmp_path / "gone.csv", 0, "file not found"):
        read_interactions(tmp_path / "gone.csv")
    path = write(tmp_path / "x.csv", "user,item,user\na,1,b\n")
    with data_error(path, 0, "file_format must be one of"):
        read_interactions(path, file_format="xlsx")
    with data_error(path, 1, "column 'user' appears 2 times"):
        read_interactions(path)


def test_interactions_trailing_blank_lines_counted(tmp_path):
    log = read_interactions(write(tmp_path / "b.csv", "user,item\na,1\n\n\n"))
    assert log.report.removed == {"blank lines at the end of b.csv": 2}


# -- MovieLens-1M ------------------------------------------------------------------------------


def ml1m_folder(root: Path, *, pairs: str = "1 1\n1 2\n2 2\n2 1\n2 3\n",
                user_map: str = "1 20\n2 10\n", item_map: str = "1 300\n2 100\n3 200\n",
                users: str = "10::F::25::4::02139\n20::M::1::10::T2N-1N4\n30::M::18::3::98101\n",
                movies: str = "100::Amélie (2001)::Comedy|Romance\n200::Heat (1995)::Action\n"
                              "300::Toy Story (1995)::Animation\n400::Unused (1990)::Drama\n",
                ) -> Path:
    folder = root / "ml-1m"
    write(folder / "sasrec_ml-1m.txt.gz", pairs)
    write(folder / "ml1m_sas_to_original_users.txt", user_map)
    write(folder / "ml1m_sas_to_original_items.txt", item_map)
    write(folder / "raw" / "users.dat", users, encoding="latin-1")
    write(folder / "raw" / "movies.dat", movies, encoding="latin-1")
    return folder


def test_movielens_1m_join(tmp_path):
    log = read_movielens_1m(ml1m_folder(tmp_path))
    assert seqs(log) == [[1, 2], [2, 1, 3]]
    assert log.items.ids == ("1", "2", "3") and log.users.ids == ("1", "2")
    attrs = {k: v.tolist() for k, v in log.user_attributes.items()}
    assert attrs == {"zip": ["T2N-1N4", "02139"], "region": [OTHER_REGION, "0"],
                     "gender": ["M", "F"], "age": ["1", "25"], "occupation": ["10", "4"],
                     "movielens_id": ["20", "10"]}
    assert log.item_features["title"] == ["", "Toy Story (1995)", "Amélie (2001)", "Heat (1995)"]
    assert log.item_features["genres"] == ["", "Animation", "Comedy|Romance", "Action"]
    assert log.item_features["year"] == ["", "1995", "2001", "1995"]
    assert log.item_features["movielens_id"] == ["", "300", "100", "200"]
    assert any("0=1, other=1" in n for n in log.report.notes)
    assert load_dataset("ml-1m", ml1m_folder(tmp_path)).items == log.items


def test_movielens_1m_equals_sasrec_reader(tmp_path):
    folder = ml1m_folder(tmp_path)
    joined, plain = read_movielens_1m(folder), read_sasrec_pairs(folder / "sasrec_ml-1m.txt.gz")
    assert seqs(joined) == seqs(plain)
    assert joined.items == plain.items and joined.users == plain.users


def test_movielens_1m_unknown_ids_in_joins(tmp_path):
    folder = ml1m_folder(tmp_path / "a", pairs="1 1\n2 1\n3 2\n3 3\n")
    with data_error(folder / "sasrec_ml-1m.txt.gz", 3, "user 3 has no line in "
                    "ml1m_sas_to_original_users.txt", "expected"):
        read_movielens_1m(folder)
    folder = ml1m_folder(tmp_path / "b", item_map="1 300\n2 100\n")
    with data_error(folder / "sasrec_ml-1m.txt.gz", 5, "item 3 has no line"):
        read_movielens_1m(folder)
    folder = ml1m_folder(tmp_path / "c", user_map="1 20\n2 99\n")
    with data_error(folder / "ml1m_sas_to_original_users.txt", 2,
                    "original user id 99 is not in users.dat"):
        read_movielens_1m(folder)
    folder = ml1m_folder(tmp_path / "d", item_map="1 300\n2 100\n3 999\n")
    with data_error(folder / "ml1m_sas_to_original_items.txt", 3, "not in movies.dat"):
        read_movielens_1m(folder)


@pytest.mark.parametrize(("kwargs", "file", "line", "fragment"), [
    ({"user_map": "1 20\n1 10\n"}, "ml1m_sas_to_original_users.txt", 2, "sas_id 1 appears again"),
    ({"item_map": "1 300\n2 300\n3 200\n"}, "ml1m_sas_to_original_items.txt", 2,
     "one-to-one"),
    ({"user_map": "1 20\n2 ten\n"}, "ml1m_sas_to_original_users.txt", 2,
     "original_id must be a non-negative integer"),
    ({"users": "10::F::25::4::02139\n20::M::1::10\n"}, "raw/users.dat", 2,
     "expected 5 '::'-separated fields"),
    ({"users": "10::F::25::4::02139\nX::M::1::10::1\n"}, "raw/users.dat", 2,
     "UserID must be a non-negative integer, got 'X'"),
    ({"users": "10::F::25::4::02139\n10::M::1::10::1\n"}, "raw/users.dat", 2,
     "UserID 10 appears again"),
    ({"movies": "100::A::Drama\n200::B\n"}, "raw/movies.dat", 2, "expected 3"),
    ({"pairs": "1 1\n1 x\n"}, "sasrec_ml-1m.txt.gz", 2, "item must be a non-negative integer"),
    ({"users": ""}, "raw/users.dat", 0, "file is empty"),
])
def test_movielens_1m_malformed_files(tmp_path, kwargs, file, line, fragment):
    folder = ml1m_folder(tmp_path, **kwargs)
    with data_error(folder / file, line, fragment):
        read_movielens_1m(folder)


def test_movielens_1m_missing_files(tmp_path):
    folder = ml1m_folder(tmp_path)
    (folder / "raw" / "movies.dat").unlink()
    with data_error(folder, 0, "movies.dat"):
        read_movielens_1m(folder)
    with data_error(tmp_path / "absent", 0, "folder not found"):
        read_movielens_1m(tmp_path / "absent")


# -- MovieLens-100K ----------------------------------------------------------------------------

GENRES = "unknown|0\nAction|1\nComedy|2\n\n"


def ml100k_folder(root: Path, *, data: str | None = None, gz: bool = False,
                  users: str = "1|24|M|technician|85711\n2|53|F|other|T8H1N\n",
                  items: str = "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
                               "2|Heat (1995)|01-Jan-1995||http://y|0|1|1\n"
                               "3|Café (1996)|||http://z|1|0|0\n") -> Path:
    folder = root / "ml-100k"
    if data is None:
        data = "1\t2\t3\t500\n2\t1\t4\t100\n1\t1\t5\t300\n1\t3\t1\t500\n1\t2\t2\t300\n"
    write(folder / ("u.data.gz" if gz else "u.data"), data)
    write(folder / "u.user", users)
    write(folder / "u.item", items, encoding="latin-1")
    write(folder / "u.genre", GENRES)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_movielens_100k(tmp_path, gz):
    log = read_movielens_100k(ml100k_folder(tmp_path, gz=gz))
    # user 1: (2,500) (1,300) (3,500) (2,300) -> by time, ties in file order: 1, 2, 2, 3
    assert raw_seqs(log) == [["1", "2", "2", "3"], ["1"]]
    assert log.timestamps[0].tolist() == [300, 300, 500, 500]
    attrs = {k: v.tolist() for k, v in log.user_attributes.items()}
    assert attrs == {"zip": ["85711", "T8H1N"], "region": ["8", OTHER_REGION],
                     "gender": ["M", "F"], "age": ["24", "53"],
                     "occupation": ["technician", "other"]}
    assert log.item_features["title"] == ["", "Toy Story (1995)", "Heat (1995)", "Café (1996)"]
    assert log.item_features["genres"] == ["", "Comedy", "Action|Comedy", "unknown"]
    assert log.item_features["year"] == ["", "1995", "1995", "1996"]
    assert log.report.rows_read == 5
    assert log.report.removed == {"blank lines at the end of u.genre": 1}


@pytest.mark.parametrize(("kwargs", "file", "line", "fragment"), [
    ({"data": "1\t1\t5\t300\n1\t2\t3\n"}, "u.data", 2, "expected 4 whitespace-separated"),
    ({"data": "1\t1\t5\t300\n1\tx\t3\t1\n"}, "u.data", 2, "item must be a non-negative integer"),
    ({"data": "1\t1\t5\t300\n7\t2\t3\t1\n"}, "u.data", 2, "user 7 is not in u.user"),
    ({"data": "1\t1\t5\t300\n1\t9\t3\t1\n"}, "u.data", 2, "item 9 is not in u.item"),
    ({"data": ""}, "u.data", 0, "file is empty"),
    ({"users": "1|24|M|technician|85711\n2|53|F|other\n"}, "u.user", 2, "expected 5 '|'"),
    ({"items": "1|T|d||u|0|0|1\n2|T|d||u|0|1\n"}, "u.item", 2, "expected 8 '|'"),
    ({"items": "1|T|d||u|0|0|1\n2|T|d||u|0|1|2\n3|T|d||u|0|1|0\n"}, "u.item", 2,
     "genre flag 'Comedy' must be 0 or 1"),
])
def test_movielens_100k_malformed(tmp_path, kwargs, file, line, fragment):
    folder = ml100k_folder(tmp_path, **kwargs)
    with data_error(folder / file, line, fragment):
        read_movielens_100k(folder)


def test_movielens_100k_missing_genre_file(tmp_path):
    folder = ml100k_folder(tmp_path)
    (folder / "u.genre").unlink()
    with data_error(folder, 0, "u.genre"):
        read_movielens_100k(folder)


# -- Twitch ------------------------------------------------------------------------------------

TWITCH_HEADER = ",user_id,streamer_name,start_time,community\n"


def test_twitch(tmp_path):
    path = write(tmp_path / "twitch.csv", TWITCH_HEADER +
                 "0,5,30,7,2\n1,5,10,3,1\n2,5,20,7,1\n3,9,10,0,1\n4,5,30,3,2\n5,9,20,1,1\n")
    log = read_twitch(path)
    assert log.name == "twitch"
    assert log.users.ids == ("5", "9") and log.items.ids == ("10", "20", "30")
    # user 5: (30,t7) (10,t3) (20,t7) (30,t3) -> by tick, ties in file order
    assert raw_seqs(log) == [["10", "30", "30", "20"], ["10", "20"]]
    assert log.timestamps[0].tolist() == [3, 3, 7, 7]
    assert [g.tolist() for g in log.interaction_groups] == [["1", "2", "2", "1"], ["1", "1"]]
    # user 5 has two views in community 1 and two in 2: the tie goes to the smaller label
    assert log.user_attributes["community"].tolist() == ["1", "1"]
    assert log.report.rows_read == 6


@pytest.mark.parametrize(("text", "line", "fragment"), [
    (TWITCH_HEADER + "0,5,30,7,2\n1,5,10,soon,1\n", 3,
     "column 'start_time' must be a non-negative integer, got 'soon'"),
    (TWITCH_HEADER + "0,5,30,7,2\n1,x,10,3,1\n", 3, "column 'user_id' must be"),
    (TWITCH_HEADER + "0,5,30,7,2\n1,5,10,3\n", 3, "expected 5 ','-separated fields"),
    (TWITCH_HEADER + "0,5,30,7,2\n1,5,10,3,-1\n", 3, "column 'community' must be"),
    (",user_id,streamer_name,start_time\n0,5,30,7\n", 0, "missing column 'community'"),
    ("", 0, "file is empty"),
])
def test_twitch_errors(tmp_path, text, line, fragment):
    path = write(tmp_path / "twitch.csv.gz", text)
    with data_error(path, line, fragment):
        read_twitch(path)


def test_twitch_needs_csv(tmp_path):
    path = write(tmp_path / "twitch.tsv", TWITCH_HEADER)
    with data_error(path, 0, "expected a .csv"):
        read_twitch(path)


# -- load_dataset and helpers ------------------------------------------------------------------


def test_load_dataset_dispatch_and_unknown_kind(tmp_path):
    path = write(tmp_path / "p.txt", "1 1\n1 2\n")
    assert seqs(load_dataset("sasrec", path)) == [[1, 2]]
    csv_path = write(tmp_path / "l.csv", "u,i\na,b\n")
    assert raw_seqs(load_dataset("interactions", csv_path, user_col="u", item_col="i")) == [["b"]]
    with pytest.raises(ValueError, match=r"kind must be one of \['interactions', 'sasrec', "
                                         r"'ml-1m', 'ml-100k', 'twitch'\], got 'movielens'"):
        load_dataset("movielens", path)
    assert DATASET_KINDS == ("interactions", "sasrec", "ml-1m", "ml-100k", "twitch")


def test_region_of_zip():
    assert [region_of_zip(z) for z in ("02139", " 98101", "T8H1N", "", "٣12")] == \
        ["0", "9", OTHER_REGION, OTHER_REGION, OTHER_REGION]


# -- real data ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_sasrec_ml1m(shared_file):
    path = shared_file("ml-1m/sasrec_ml-1m.txt.gz")
    start = time.perf_counter()
    log = read_sasrec_pairs(path)
    seconds = time.perf_counter() - start
    assert (log.num_users, log.num_items, log.num_interactions) == (6040, 3416, 999_611)
    assert log.items.ids == tuple(str(k) for k in range(1, 3417))
    assert all(log.items.index(k) == k for k in (1, 2, 1000, 3416))
    assert log.users.index(1) == 0 and log.users.index(6040) == 6039
    assert seqs(log)[0][:3] == [1, 2, 3]  # the file starts "1 1", "1 2", "1 3"
    lengths = [len(s) for s in log.sequences]
    assert (min(lengths), max(lengths)) == (18, 2277)
    assert log.report.removed == {}
    assert seconds < 5, f"reading 1M lines took {seconds:.1f} s"


@pytest.mark.realdata
def test_real_ml1m_join(shared_file):
    folder = shared_file("ml-1m")
    shared_file("ml-1m/raw/users.dat")
    log = read_movielens_1m(folder)
    assert (log.num_users, log.num_items, log.num_interactions) == (6040, 3416, 999_611)
    regions = log.user_attributes["region"]
    assert len(regions) == 6040 and set(regions.tolist()) <= set("0123456789")
    assert int((regions == "9").sum()) == 1468
    assert set(log.user_attributes["gender"].tolist()) == {"F", "M"}
    assert log.user_attributes["movielens_id"][0] == "5988"
    assert log.item_features["movielens_id"][1] == "1198"
    assert log.item_features["title"][1] == "Raiders of the Lost Ark (1981)"
    assert all(log.item_features["title"][1:])


@pytest.mark.realdata
def test_real_ml100k(shared_file):
    log = read_movielens_100k(shared_file("ml-100k"))
    assert (log.num_users, log.num_items, log.num_interactions) == (943, 1682, 100_000)
    assert all(np.all(np.diff(t) >= 0) for t in log.timestamps)
    assert int((log.user_attributes["region"] == OTHER_REGION).sum()) == 18
    assert log.item_features["title"][1] == "Toy Story (1995)"
    assert log.report.removed == {"blank lines at the end of u.genre": 1}  # as shipped


@pytest.mark.realdata
def test_real_twitch(shared_file):
    log = read_twitch(shared_file("twitch/twitch105k.csv.gz"))
    assert (log.num_users, log.num_items, log.num_interactions) == (2000, 1742, 105_745)
    groups = np.concatenate(log.interaction_groups)
    assert len(set(groups.tolist())) == 11
    assert all(np.all(np.diff(t) >= 0) for t in log.timestamps)
    assert set(log.user_attributes["community"].tolist()) <= set(groups.tolist())
