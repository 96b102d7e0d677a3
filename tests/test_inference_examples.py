"""examples/generate.py and examples/pipeline_chat.py run as scripts against a saved folder and print what the model
generates in-process."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_checkpoint import chat, save_tiny_checkpoint, tiny_images
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline


EXAMPLES = Path(__file__).parent.parent / "examples"
MAX_NEW_TOKENS = 4
QUESTIONS = ["w1 w2 w3", "w4 w5"]  # two turns of pipeline_chat.py


@pytest.fixture(scope="module")
def folder_and_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    save_tiny_checkpoint(folder)
    image_path = folder.parent / "image.png"
    tiny_images(1)[0].save(image_path)
    return folder, image_path


@pytest.fixture(scope="module")
def example_runs(folder_and_image):
    """Starts both scripts at once (most of their time is importing torch and transformers)."""
    folder, image_path = folder_and_image
    commands = {
        "generate": [
            "generate.py", folder, "--image", image_path, "--question", "w1 w2 w3",
            "--max-new-tokens", MAX_NEW_TOKENS, "--vision-keep-rate", 0.34,
        ],
        "pipeline_chat": [
            "pipeline_chat.py", folder, "--image", image_path, "--question", QUESTIONS[0], "--question", QUESTIONS[1],
            "--max-new-tokens", MAX_NEW_TOKENS,
        ],
    }  # fmt: skip
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (script, *args) in commands.items()
    }
    return {name: process.communicate(timeout=300) + (process.returncode,) for name, process in processes.items()}


def printed_lines(run) -> list[str]:
    stdout, stderr, returncode = run
    assert returncode == 0, stdout + stderr
    return stdout.splitlines()


def test_generate_example_prints_the_answer_and_the_sparsity_report(folder_and_image, example_runs):
    folder, image_path = folder_and_image
    lines = printed_lines(example_runs["generate"])

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(
        chat("w1 w2 w3", Image.open(image_path).convert("RGB")),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
        sparsity={"vision_keep_rate": 0.34},
    )  # fmt: skip
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    report = out.past_key_values.sparsity_report()[0]
    assert report["image_tokens_kept"] == 3  # floor(9 x 0.34)
    assert lines == [
        f"answer: {answer.strip()}",
        "image tokens kept: 3/9",
        f"generated tokens kept in the cache: {report['generated_tokens_kept']}/{MAX_NEW_TOKENS - 1}",
        (
            f"KV cache: {report['stored_kv_bytes']} bytes stored, {report['dense_kv_bytes']} bytes dense "
            f"({report['kv_bytes_ratio']:.1%})"
        ),
    ]


def test_pipeline_chat_example_holds_a_two_turn_conversation(folder_and_image, example_runs):
    folder, image_path = folder_and_image
    lines = printed_lines(example_runs["pipeline_chat"])

    pipe = pipeline("image-text-to-text", model=str(folder))
    conversation = chat(QUESTIONS[0], Image.open(image_path).convert("RGB"))
    expected = []
    for turn, question in enumerate(QUESTIONS):
        if turn:
            conversation.append({"role": "user", "content": [{"type": "text", "text": question}]})
        (result,) = pipe(text=conversation, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        conversation = result["generated_text"]
        expected += [f"USER: {question}", f"ASSISTANT: {conversation[-1]['content'].strip()}"]
    assert lines == expected
    assert len(conversation) == 4 and conversation[-1]["role"] == "assistant"
