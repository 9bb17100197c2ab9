"""CAST models: the student (encoder -> neck -> masked-attention decoder), the interface every
model follows (`protocol`), the loader that reads any saved model (`auto`) and ONNX export."""
