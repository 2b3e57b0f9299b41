"""Reading fio's JSON output, for the report scripts (imported from their directory)."""
import json


def bs_bytes(text):
    """fio's block size text ("4k", "1M", "65536") in bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.lower().rstrip("b").rstrip("i")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def fio_job(path):
    """The first job of fio's JSON report at path (with group_reporting: one entry for all
    numjobs) and its options merged over the global ones."""
    with open(path) as f:
        doc = json.load(f)
    job = doc["jobs"][0]
    return job, doc.get("global options", {}) | job["job options"]
