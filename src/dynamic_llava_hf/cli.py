"""`dynamic-llava` command line."""

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynamic-llava", description="Dynamic-LLaVA for Hugging Face Transformers")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="batched generation with a tiny random model; prints the sparsity report")
    demo.add_argument("--batch-size", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=32)

    check = commands.add_parser(
        "check-reference", help="compare against the official implementation's outputs on the tiny reference"
    )
    check.add_argument(
        "reference_dir", help="folder with checkpoint/ and reference.pt (shared/reference/original_tiny)"
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")

    args = parser.parse_args(argv)
    from . import demo as demos  # imported late: torch and transformers load slowly

    if args.command == "demo":
        report = demos.run_demo(args.batch_size, args.max_new_tokens)
        print("row  image kept/total  generated kept/total  stored KV / dense KV")
        for row, entry in enumerate(report):
            print(
                f"{row:>3}  {entry['image_tokens_kept']:>5}/{entry['image_tokens_total']:<10} "
                f"{entry['generated_tokens_kept']:>9}/{entry['generated_tokens_total']:<10} "
                f"{entry['kv_bytes_ratio']:.3f}"
            )
        return 0

    results = demos.check_reference(args.reference_dir)
    ok = all(r["tokens_match"] and r["kv_lengths_match"] and r["max_logit_diff"] <= 1e-4 for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("scenario     sample   tokens  KV lengths  max |logit diff|")
        for r in results:
            print(
                f"{r['scenario']:<12} {r['sample']:<8} {'ok' if r['tokens_match'] else 'DIFF':<7} "
                f"{'ok' if r['kv_lengths_match'] else 'DIFF':<11} {r['max_logit_diff']:.2e}"
            )
        print("all match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
