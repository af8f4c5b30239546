"""The batched processors produce, per row, the probabilities of HF's own LogitsProcessorList for that row's params."""

from __future__ import annotations

import random

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import Sequence
from genserve.scheduler.features.batch_state import BatchState
from genserve.scheduler.features.generate_processors import NoRepeatNgram
from genserve.scheduler.features.logits_feature import LogitsStep
from genserve.scheduler.features.logits_processing import process_logits
from genserve.scheduler.features.sampling import select_tokens
from genserve.scheduler.features.warpers import warp_for_sampling
from tests.architectures import COMMON

VOCAB = 97
ROW_PARAMETERS = [
    GenerationParameters(do_sample=True, temperature=0.7, top_k=10, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, top_p=0.9, top_k=0, repetition_penalty=1.2, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, min_p=0.1, temperature=1.3, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, typical_p=0.8, no_repeat_ngram_size=2, eos_token_id=(2,)),
    GenerationParameters(eos_token_id=(2, 3), min_new_tokens=5, bad_words_ids=((4,), (5, 6), (7, 8, 9))),
    GenerationParameters(
        do_sample=True, top_k=5, top_p=0.5, min_p=0.2, typical_p=0.95, temperature=0.5, eos_token_id=(2,)
    ),
    GenerationParameters(repetition_penalty=0.7, no_repeat_ngram_size=3, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, top_k=0, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, top_k=0, epsilon_cutoff=0.02, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, top_k=20, eta_cutoff=0.05, temperature=0.8, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, top_k=0, top_h=0.4, eos_token_id=(2,)),
    GenerationParameters(do_sample=True, top_h=0.7, temperature=0.6, top_p=0.95, eos_token_id=(2,)),
]


def _hf_processors(params: GenerationParameters, prompt_length: int):
    model = LlamaForCausalLM(LlamaConfig(**COMMON | dict(vocab_size=VOCAB)))  # only its processors are used
    config = GenerationConfig(
        do_sample=params.is_sampling,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        typical_p=params.typical_p,
        epsilon_cutoff=params.epsilon_cutoff,
        eta_cutoff=params.eta_cutoff,
        top_h=params.top_h,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        min_new_tokens=params.min_new_tokens,
        bad_words_ids=[list(b) for b in params.bad_words_ids] or None,
        eos_token_id=list(params.eos_token_id),
    )
    model._prepare_special_tokens(config, device=torch.device("cpu"))
    return model._get_logits_processor(config, input_ids_seq_length=prompt_length, device="cpu")


def _batch_of_every_case(order: list[int] | None = None) -> tuple[BatchState, list[Sequence]]:
    """A batch with a row per ROW_PARAMETERS case, in `order` (default: the cases' own); `sequences` by case."""
    rng = random.Random(0)
    state = BatchState(max_rows=len(ROW_PARAMETERS), vocab_size=VOCAB, capacity=64, device=torch.device("cpu"))
    sequences = []
    for i, params in enumerate(ROW_PARAMETERS):
        prompt = [rng.randrange(4, 12) for _ in range(rng.randint(2, 12))]
        generated = [rng.randrange(2, 12) for _ in range(rng.randint(0, 8))]
        if i == 4:
            generated = [1, 7, 8]  # ends with the prefix of the banned (7, 8, 9)
        sequences.append(Sequence(str(i), prompt, params, generated_ids=generated))
    for i in order or range(len(sequences)):
        state.add_row(sequences[i])
    state.refresh_composition()
    return state, sequences


def _processed_like_hf(state: BatchState) -> torch.Tensor:
    """Our batched processing and warping of random logits, compared row by row with HF's processors for that
    row's parameters; returns what we computed."""
    torch.manual_seed(0)
    logits = torch.randn(state.num_rows, VOCAB) * 3
    processed = process_logits(logits.clone(), state, LogitsStep(max(s.num_tokens for s in state.rows), {}))
    sampled = warp_for_sampling(processed[state.sampling_index], state.warpers, state.sampling_index)
    processed[state.sampling_index] = sampled
    ours = torch.softmax(processed, dim=-1)
    for i, seq in enumerate(state.rows):
        input_ids = torch.tensor([seq.prompt_ids + seq.generated_ids])
        hf = _hf_processors(seq.params, seq.num_prompt_tokens)
        expected = torch.softmax(hf(input_ids, logits[i : i + 1].clone()), -1)
        torch.testing.assert_close(ours[i : i + 1], expected, atol=1e-5, rtol=0, msg=f"row {i}: {seq.params}")
    return processed


def test_batched_processing_matches_hf_per_row() -> None:
    state, _ = _batch_of_every_case()
    processed = _processed_like_hf(state)
    ours = torch.softmax(processed, dim=-1)
    # The cases above must actually bite, or the comparison proves nothing.
    assert torch.isinf(processed[4, [3, 4, 9]]).all() and (ours == 0).sum(dim=1).gt(0).sum() >= 6


def test_every_feature_follows_its_rows_when_rows_leave() -> None:
    """Rows leaving move the last rows into their holes: each feature's slot tensors move with them and its
    host-side facts are rebuilt, so every row still processes as HF would for its own parameters."""
    cases = list(reversed(range(len(ROW_PARAMETERS))))  # the processors' cases last, so that they move
    state, sequences = _batch_of_every_case(cases)
    assert state.feature(NoRepeatNgram).sizes_in_use == (2, 3)
    leaving = {0, 1, 2, 3, cases.index(6)}  # case 6 holds the only 3-gram ban
    state.remove_rows(leaving)
    state.refresh_composition()
    survivors = [case for slot, case in enumerate(cases) if slot not in leaving]
    # the bad-words, n-gram and penalty rows moved into the holes
    assert state.rows[:4] == [sequences[case] for case in (4, 3, 2, 1)]
    assert sorted(seq.request_id for seq in state.rows) == sorted(str(case) for case in survivors)
    _processed_like_hf(state)
    assert state.feature(NoRepeatNgram).sizes_in_use == (2,)


def test_presence_frequency_penalties_and_logit_bias_follow_openai_semantics() -> None:
    """Counts cover generated tokens only; rows without these parameters are untouched."""
    state = BatchState(max_rows=3, vocab_size=VOCAB, capacity=32, device=torch.device("cpu"))
    rows = [
        Sequence(
            "pen",
            [4, 4, 5],
            GenerationParameters(presence_penalty=0.5, frequency_penalty=0.25),
            generated_ids=[6, 6, 6, 7],
        ),
        Sequence("bias", [4, 5], GenerationParameters(logit_bias=((9, 5.0), (10, -100.0))), generated_ids=[9]),
        Sequence("plain", [4, 6], GenerationParameters(), generated_ids=[6]),
    ]
    for seq in rows:
        state.add_row(seq)
    state.refresh_composition()
    logits = torch.randn(3, VOCAB)
    processed = process_logits(logits.clone(), state, LogitsStep(max(s.num_tokens for s in rows), {}))
    expected = logits.clone()
    expected[0, 6] -= 0.25 * 3 + 0.5  # generated three times
    expected[0, 7] -= 0.25 * 1 + 0.5
    expected[1, 9] += 5.0
    expected[1, 10] -= 100.0
    torch.testing.assert_close(processed, expected, atol=1e-6, rtol=0)  # token 4 and 5 (prompt only): untouched


def test_greedy_rows_take_the_first_of_tied_maxima_as_argmax_does() -> None:
    """Greedy picks are argmax's, as `generate()`'s: ties go to the lowest token id and a NaN counts as the largest
    (scores of few distinct values tie often; one row holds NaNs, one is all -inf)."""
    state = BatchState(max_rows=8, vocab_size=VOCAB, capacity=32, device=torch.device("cpu"))
    for index in range(8):
        state.add_row(Sequence(str(index), [4, 5], GenerationParameters(), generated_ids=[6]))
    state.refresh_composition()
    scores = torch.randint(0, 3, (8, VOCAB)).float()
    scores[2, [7, 11]] = float("nan")
    scores[5] = float("-inf")
    next_tokens, _ = select_tokens(scores, state, torch.Generator().manual_seed(0))
    assert next_tokens.tolist() == torch.argmax(scores, dim=-1).tolist()
    assert next_tokens[2] == 7 and next_tokens[5] == 0
