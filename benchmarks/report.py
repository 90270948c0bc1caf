"""The benchmarks' shared output contract: a JSON record on disk, then the headline as the last line."""
import json
import os
import time


def write_results(out: str, name: str, record: dict, headline: dict, start: float) -> None:
    """Write <out>/<name>.json (record + headline + wall time) and print the headline JSON last."""
    record = {**record, "headline": headline, "wall_seconds": time.time() - start}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wall time {record['wall_seconds']:.0f}s; wrote {os.path.join(out, name)}.json/.png")
    print(json.dumps({key: round(value, 4) for key, value in headline.items()}))
