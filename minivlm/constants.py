"""Facts that several parts of minivlm must agree on, each defined once here.

The data pipeline writes them, the model and the losses read them, the tokenizer gives the
special tokens one id each; none of them may drift apart.
"""

IMAGE_TOKEN = "<image>"  # one per image in the text; becomes that image's rows of embeddings
SEG_TOKEN = "[SEG]"  # LISA: the hidden state that predicts it prompts the mask decoder
ROLES = ("system", "user", "assistant")
FINAL_ANSWER_PREFIX = "### The final answer is: "  # Chiron-o1's answer marker; eval reads after it

IGNORE_INDEX = -100  # label the loss skips (prompt, image rows, padding): torch's default
MASK_IGNORE = 255  # pixel label the mask losses and IoU skip (LISA's "ignore" regions)
MASK_VALUES = (0, 1, MASK_IGNORE)  # background, object, ignore
