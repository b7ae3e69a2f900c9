from thinkforge import format as fmt


def test_render_matches_hf_chat_template(char_tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n<answer>4</answer>"},
        {"role": "user", "content": "and 3+3?"},
    ]
    for gen in (True, False):
        assert fmt.render_chat(msgs, gen) == char_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = fmt.render_chat(msgs)
    assert "2+2=4" not in text and "<answer>4</answer>" in text  # earlier thinking dropped
    last = msgs[:3]  # the last assistant turn keeps its thinking (it is the training target)
    assert "2+2=4" in char_tok.apply_chat_template(last, tokenize=False)


def test_completion_round_trip():
    for thinking, answer in [("7*8=56\ncheck: 56", "56"), ("", "x"), ("a\n\nb", "-3/4")]:
        p = fmt.parse_completion(fmt.render_completion(answer, thinking) + fmt.IM_END)
        assert (p.thinking, p.answer, p.tagged, p.well_formed) == (thinking, answer, True, True)


def test_malformed_completions():
    cases = {
        "<answer>4</answer>": (None, False),  # no thinking
        "<think>\nx\n</think>\n<answer>4</answer> extra": ("x", False),
        "<think>a</think><think>b</think><answer>4</answer>": ("a", False),
        "<think>\nstill going": ("still going", False),
        "<think>\nx\n</think>\nthe result is \\boxed{4}": ("x", True),
    }
    for text, (thinking, ok) in cases.items():
        p = fmt.parse_completion(text)
        assert (p.thinking, p.well_formed) == (thinking, ok), text
    assert fmt.parse_completion("<think>\nstill going").truncated_thinking


def test_count_reasoning_tokens(char_tok):
    ids = char_tok.encode("<think>\nab\n</think>\n<answer>7</answer>", add_special_tokens=False)
    # <think> \n a b \n </think>  = 6 thinking tokens; \n <answer> 7 </answer> = 4 answer tokens
    assert fmt.count_reasoning_tokens(ids, char_tok) == (6, 4)
    assert fmt.count_reasoning_tokens(char_tok.encode("<think>\nab", add_special_tokens=False), char_tok) == (4, 0)
    assert fmt.count_reasoning_tokens(char_tok.encode("<answer>7</answer>", add_special_tokens=False), char_tok) == (0, 3)


# One split, every reader: (completion, thinking, answer shown and parsed, value graded).
SPLITS = [
    ("<think>x</think><answer>a <answer>b</answer>", "x", "b", "b"),  # several answer tags: the last
    ("<think>x</think><think>y</think><answer>4</answer>", "x", "4", "4"),  # several think blocks: the first close
    ("<think>\nx\n</think>\n<answer>42", "x", "42", "42"),  # missing close tag
    ("<think>so \\boxed{3}</think>\n<answer>4</answer>", "so \\boxed{3}", "4", "4"),  # boxed inside thinking
    ("<think>\nso \\boxed{3}", "so \\boxed{3}", "", None),  # truncated thinking: no answer at all
    ("<think>\nx\n</think>\n<answer></answer>", "x", "", None),  # empty answer
    ("<think>\nx\n</think>\n<answer> \\boxed{5} </answer>", "x", "\\boxed{5}", "5"),
    ("<think>\nx\n</think>\nThe answer is 42.", "x", "The answer is 42.", "42"),  # free text: last number
    ("<answer>7</answer>", None, "7", "7"),  # no thinking
    ("x\n</think>\n<answer>3</answer>", "x", "3", "3"),  # the template opened <think> in the prompt
    ("<think>\nx\n</think>\n<answer>4</answer><|im_end|><answer>9</answer>", "x", "4", "4"),  # after end of turn
    ("<think>\nx\n</think>\n<answer>4</think></answer>", "x", "4", "4"),  # stray tag inside the answer
]


def test_server_grader_scorers_and_reward_models_agree_on_every_split():
    from thinkforge.scorers import answer_steps
    from thinkforge.serve.service import split_text
    from thinkforge.tasks import get_task
    from thinkforge.train.reward_model import gold_labels, judge_labels
    from thinkforge.verify import extract_answer

    task = get_task("add")
    prob = next(iter(task.candidates(0)))
    for text, thinking, answer, graded in SPLITS:
        p = fmt.parse_completion(text)
        assert (p.thinking, p.answer) == (thinking, answer), text
        assert extract_answer(text) == graded, text  # the grader scores the shown answer
        shown = split_text(text)
        assert (shown.thinking, shown.visible, shown.closed) == (thinking, answer, not p.truncated_thinking), text
        head, steps, is_answer = answer_steps(text)
        assert head + "".join(steps) == text.split(fmt.IM_END)[0], text  # cut, not rewritten
        answer_part = "".join(s for s, a in zip(steps, is_answer) if a)
        assert fmt.parse_completion(answer_part, thinking_open=thinking is not None).answer == answer, text
        assert is_answer.count(True) == (0 if p.truncated_thinking else 1), text
        for labels in (gold_labels(task, prob, text, True), judge_labels(task, prob, text, True)):
            assert [lab for lab, a in zip(labels, is_answer) if a] == [1.0] * is_answer.count(True), text
