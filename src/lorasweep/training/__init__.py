"""What runs in a trial's worker: data, model, peft, the Trainer, measurements. The only
package that imports torch, transformers and peft at module level (with tools.estimate)."""
