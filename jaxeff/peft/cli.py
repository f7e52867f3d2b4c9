"""The PEFT family's verbs (registered into ``jaxeff``'s parser by :mod:`jaxeff.cli`, ``FAMILY_CLIS``):

    jaxeff export-adapter --checkpoint runs/lora --out adapters/lora      # PEFT LoRA format
    jaxeff merge-adapter --base runs/base --adapter adapters/lora --out runs/merged
    jaxeff import-adapter --base runs/base --adapter adapters/lora --out runs/imported

No jax at module level: this module is imported for every ``jaxeff`` command. See docs/peft.md.
"""

from __future__ import annotations


def register(sub) -> None:
    x = sub.add_parser("export-adapter", help="save the LoRA/QLoRA adapter of a run on its own")
    x.add_argument("--checkpoint", required=True, help="a lora or qlora run folder (or its checkpoints folder)")
    x.add_argument("--out", required=True, help="new adapter folder (PEFT LoRA format)")
    x.add_argument("--step", type=int, default=None)
    x.add_argument(
        "--base-model", default=None, help="base_model_name_or_path for adapter_config.json (default: DIR of train.init_from=hf:DIR, else none)"
    )
    x.set_defaults(handler=cmd_export_adapter)

    m = sub.add_parser("merge-adapter", help="fold an adapter into a base checkpoint, saved as a new run")
    m.add_argument("--base", required=True, help="the base run folder the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder (export-adapter's, or any PEFT LoRA folder)")
    m.add_argument("--out", required=True, help="new run folder, e.g. runs/merged")
    m.set_defaults(handler=cmd_merge_adapter)

    i = sub.add_parser("import-adapter", help="a lora run from a base run and an adapter folder (PEFT LoRA or jaxeff)")
    i.add_argument("--base", required=True, help="the base run folder (a plain lm run, e.g. convert --from-hf's)")
    i.add_argument("--adapter", required=True, help="adapter folder: adapter_config.json + adapter_model.safetensors")
    i.add_argument("--out", required=True, help="new run folder (method lora, adapters unmerged), e.g. runs/imported")
    i.set_defaults(handler=cmd_import_adapter)


def cmd_export_adapter(args) -> int:
    from jaxeff.peft.adapters import export_adapter

    print(f"adapter saved to {export_adapter(args.checkpoint, args.out, args.step, args.base_model)}")
    return 0


def cmd_merge_adapter(args) -> int:
    from jaxeff.peft.adapters import merge_adapter

    print(f"merged model saved as run {merge_adapter(args.base, args.adapter, args.out)}")
    return 0


def cmd_import_adapter(args) -> int:
    from jaxeff.peft.adapters import import_adapter

    print(f"adapter imported as lora run {import_adapter(args.base, args.adapter, args.out)}")
    return 0
