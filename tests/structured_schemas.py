"""The three JSON schemas the structured-output tests validate against and bench/structured.py
compiles: nested objects, arrays, enums and required fields, every string and number bounded so
that a sampled output always ends."""

PERSON = {  # nested objects, a pattern, bounded numbers, required fields
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "address"],
}
SHOPPING = {  # arrays of strings and of objects
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 10},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object",
                            "properties": {"what": {"type": "string", "maxLength": 10},
                                           "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                            "required": ["what", "count"]}},
    },
    "required": ["store", "items"],
}
REVIEW = {  # enums, booleans, an array of enums
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "recommend": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["price", "quality", "service"]}},
    },
    "required": ["sentiment", "stars", "recommend", "tags"],
}
SCHEMAS = {"person": PERSON, "shopping": SHOPPING, "review": REVIEW}
