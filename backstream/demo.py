"""``backstream demo``: the main job on embedded defaults, offline.

A job streams from the built-in model; the watcher drops midway while the job
goes on in the background; a new watch resumes from the last ``seq`` seen and
the joined text is checked against the stored answer.
"""

from __future__ import annotations

import sys

import trio

from backstream import Config, open_runtime


def _progress(label: str, seen: int, total: int) -> None:
    width = 30
    filled = width * min(seen, total) // max(total, 1)
    sys.stderr.write(f"\r{label:<10} [{'#' * filled}{'.' * (width - filled)}] {seen}/{total} words")
    sys.stderr.flush()


async def run_demo(words: int, rate: float) -> int:
    async with open_runtime(Config(drain_timeout=0)) as rt:
        started = await rt.start_job(
            user="demo",
            thread_id="demo-thread",
            message_id="demo-1",
            model="backstream/lorem",
            messages=[{"role": "user", "content": "Tell me something long."}],
            params={"max_tokens": words, "tokens_per_s": rate},
        )
        print(f"started job {started.job_id} ({words} words at {rate:g}/s)", file=sys.stderr)
        text, last_seq = "", 0
        async with rt.watch(started.job_id, user="demo", after_seq=0) as batches:
            async for batch in batches:
                text += batch.text
                last_seq = batch.to_seq
                _progress("watching", len(text.split()), words)
                if len(text.split()) >= words // 2:
                    break  # the viewer leaves; the job does not stop
        print(f"\nwatcher left at seq {last_seq}; the job keeps running...", file=sys.stderr)
        await trio.sleep(words / rate / 4)
        async with rt.watch(started.job_id, user="demo", after_seq=last_seq) as batches:
            async for batch in batches:
                assert batch.from_seq == last_seq + 1, "a gap in the resumed watch"
                text += batch.text
                last_seq = batch.to_seq
                _progress("resumed", len(text.split()), words)
                if batch.terminal is not None:
                    status = batch.terminal.status
        info = await rt.get_job(started.job_id, user="demo", include_content=True)
        print(f"\njob {status}; {len(text)} characters, last seq {last_seq}", file=sys.stderr)
        print(text)
        if text != info.content:
            print("MISMATCH: the resumed text differs from the stored answer", file=sys.stderr)
            return 1
        print("resumed text == stored answer: nothing lost, nothing repeated", file=sys.stderr)
        return 0
