"""Run by tests/test_remote_code.py inside a virtual environment in which `dynamic_llava_hf` is not installed.

It uses nothing but transformers, torch and the files of a saved checkpoint folder (loaded with
`trust_remote_code=True`), and writes what it observed to a file for the test to compare with the installed package.

Usage: python remote_code_probe.py REQUEST.json OUTPUT.pt
"""

import importlib.util
import json
import sys

import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline


def class_path(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def main(request_path: str, output_path: str) -> None:
    with open(request_path) as file:
        request = json.load(file)
    folder = request["folder"]

    # The point of the exercise: the package itself must be absent.
    if importlib.util.find_spec("dynamic_llava_hf") is not None:
        raise SystemExit(f"dynamic_llava_hf is importable here (sys.path = {sys.path}); the probe proves nothing")
    try:
        import dynamic_llava_hf  # noqa: F401
    except ModuleNotFoundError as error:
        import_error = str(error)
    else:
        raise SystemExit("import dynamic_llava_hf succeeded")

    # Without trust_remote_code a non-interactive load must refuse (transformers asks, gets no answer, raises).
    try:
        AutoConfig.from_pretrained(folder)
        untrusted_error = None
    except ValueError as error:
        untrusted_error = str(error)

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder)
    images = [Image.open(path).convert("RGB") for path in request["images"]]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in request["questions"]
    ]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    generated = model.generate(
        **inputs,
        max_new_tokens=request["max_new_tokens"],
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    cache = generated["cache"] if "cache" in generated else generated["past_key_values"]  # 5.24 renamed it
    with torch.no_grad():
        prefill = model(**inputs)

    base_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        base_hidden = base_model(**inputs).last_hidden_state

    # The image-text-to-text pipeline on the remote code: a batch of two chats.
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        for image, question in zip(images, request["questions"])
    ]
    answers = pipe(text=chats, batch_size=2, max_new_tokens=request["max_new_tokens"], return_full_text=False)

    torch.save(
        {
            "sys_path": sys.path,
            "import_error": import_error,
            "untrusted_error": untrusted_error,
            "config_class": class_path(config),
            "model_class": class_path(model),
            "base_model_class": class_path(base_model),
            "cache_class": class_path(cache),
            "inputs": dict(inputs),
            "sequences": generated.sequences,
            "scores": torch.stack(generated.scores),
            "stored_lengths": cache.stored_lengths(),
            "sparsity_report": cache.sparsity_report(),
            "prefill_logits": prefill.logits,
            "kept_image_token_indices": prefill.kept_image_token_indices,
            "base_hidden": base_hidden,
            "pipeline_model_class": class_path(pipe.model),
            "pipeline_answers": [answer[0]["generated_text"] for answer in answers],
        },
        output_path,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
