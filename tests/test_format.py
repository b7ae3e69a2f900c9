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
        assert (p.thinking, p.answer_text, p.well_formed) == (thinking, f"<answer>{answer}</answer>", True)


def test_malformed_completions():
    cases = {
        "<answer>4</answer>": (None, False),  # no thinking
        "<think>\nx\n</think>\n<answer>4</answer> extra": ("x", False),
        "<think>a</think><think>b</think><answer>4</answer>": ("b", False),
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
