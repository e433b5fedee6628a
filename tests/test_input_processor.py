"""Input processing: one thread-safe call does all of a request's CPU work; the grammar compiler is lazy,
built once, and can be warmed in the background."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine import SamplingParams
from engine.async_llm import AsyncLLM
from engine.input_processor import ContextWindowError, InputProcessor
from util import image_chat

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def prompts():
    return ["Hello there", [{"role": "user", "content": "Tell me about rivers."}],
            image_chat([(60, 90)], "What is this?", seed=3), list(range(1000, 1040)),
            image_chat([(120, 40), (30, 30)], "Two.", seed=4), "<s>[INST]raw[/INST]"]


def summary(req):
    """What a request carries, in comparable form."""
    return (req.prompt_token_ids, [(i.hash, i.start, i.end, i.img_positions.tolist()) for i in req.images],
            req.max_tokens, req.seed, req.matcher is not None)


def test_process_from_many_threads_equals_sequential(tiny_llm):
    eng = tiny_llm.engine
    grammar = eng.grammars.json_schema(SCHEMA)
    jobs = [(p, SamplingParams(max_tokens=8, seed=k, grammar=grammar if k % 2 else None), k == 5)
            for k, p in enumerate(prompts())] * 4
    want = [summary(eng.process(p, sp, f"seq-{k}", raw=raw)) for k, (p, sp, raw) in enumerate(jobs)]
    start = threading.Barrier(8)

    def work(k):
        if k < 8:
            start.wait()            # the first eight start together
        p, sp, raw = jobs[k]
        return eng.process(p, sp, f"par-{k}", raw=raw)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, range(len(jobs))))
    assert [summary(r) for r in got] == want
    assert any(r.images for r in got) and any(r.matcher for r in got)
    # every guided request has its own matcher: advancing one leaves the others at the start
    matchers = [r.matcher for r in got if r.matcher is not None]
    assert len({id(m) for m in matchers}) == len(matchers)
    first = eng.tokenizer.encode_text("{")[0]
    assert matchers[0].consume_token(first)
    masks = [bytes(m.compute_bitmask()) for m in matchers]
    assert masks[0] != masks[1] and all(m == masks[1] for m in masks[1:])
    # ids drawn by the processor are unique across threads
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: eng.process("hi").request_id, range(64)))
    assert len(set(ids)) == 64
    assert not eng.has_unfinished()                 # processing queues nothing


def test_process_refuses_what_can_never_run(tiny_llm):
    eng = tiny_llm.engine
    with pytest.raises(ContextWindowError):
        eng.process([1] * 127_000, SamplingParams(max_tokens=1010))
    with pytest.raises(ValueError, match="raw prompt cannot contain"):
        eng.process("[IMG]", raw=True)
    with pytest.raises(TypeError):
        eng.process(12)


def test_grammar_compiler_is_lazy_built_once_and_warmable(tiny_llm, monkeypatch):
    import engine.input_processor as ip
    built = []
    real = ip.GrammarCompiler

    def counting(tokenizer):
        built.append(threading.current_thread().name)
        return real(tokenizer)
    monkeypatch.setattr(ip, "GrammarCompiler", counting)
    eng = tiny_llm.engine
    proc = InputProcessor(eng.tokenizer, eng.config, eng.block_manager.num_blocks)
    assert built == []                                          # nothing until asked
    future = proc.warm_grammars()
    with ThreadPoolExecutor(6) as pool:                         # requests arriving during the build wait for it
        compilers = list(pool.map(lambda _: proc.grammars, range(6)))
    assert future.result(timeout=120) is compilers[0] and all(c is compilers[0] for c in compilers)
    assert len(built) == 1
    req = proc.process("JSON please", SamplingParams(grammar=proc.grammars.json_schema(SCHEMA)))
    assert req.matcher is not None and len(built) == 1

    def broken(tokenizer):
        raise RuntimeError("no vocabulary")
    monkeypatch.setattr(ip, "GrammarCompiler", broken)
    failing = InputProcessor(eng.tokenizer, eng.config, eng.block_manager.num_blocks).warm_grammars()
    assert isinstance(failing.exception(timeout=60), RuntimeError)


def test_async_submit_processes_off_the_event_loop(tiny_llm, monkeypatch):
    eng = tiny_llm.engine
    threads = []
    process = eng.process

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return process(*args, **kwargs)
    monkeypatch.setattr(eng, "process", recording)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def main():
        llm = AsyncLLM(engine=eng)
        try:
            loop_thread = threading.current_thread()
            out = await llm.generate("Hello", params)
            assert threads and threads[-1] is not loop_thread and threads[-1].name != "engine-loop"
            # a request processed elsewhere (the server's worker pool) is queued as is
            req = await asyncio.get_running_loop().run_in_executor(None, process, "Hello", params)
            last = None
            async for last in llm.submit_request(req):
                pass
            assert last.finished and last.token_ids == out.token_ids
            assert np.array_equal(req.all_token_ids[:req.num_prompt_tokens], out.prompt_token_ids)
        finally:
            llm.shutdown()
    asyncio.run(main())
    eng.check_integrity()
