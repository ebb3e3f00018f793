// Self-NPO Train (TDFT): picking a preset shows its values in steps / learning_rate / lora_rank /
// teacher, instead of "0 = the preset's" placeholders. The values come from the node definition
// (the preset combo's `selfnpo_presets`, written by nodes/train.py from the presets themselves).
// Workflows saved before keep their stored values: 0 and "preset" still mean the preset's value
// (learning_rate 0: the model family's recipe, which the node shows before training starts).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfy-selfnpo.TrainPresets",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SelfNPOTrainTDFT") return;
    const spec = nodeData.input?.required?.preset;
    const presets = spec?.[1]?.selfnpo_presets;
    if (!presets) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const preset = this.widgets?.find((w) => w.name === "preset");
      if (!preset) return result;
      const fill = (name) => {
        const values = presets[name] ?? {};
        for (const widget of this.widgets) {
          if (widget.name in values) widget.value = values[widget.name];
        }
        this.setDirtyCanvas?.(true, true);
      };
      const callback = preset.callback;
      preset.callback = function (value) {
        fill(value);
        return callback?.apply(this, arguments);
      };
      fill(preset.value); // a new node; a loaded workflow then sets its own stored values
      return result;
    };
  },
});
