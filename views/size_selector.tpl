% words = {'high': 'plenty left', 'medium': 'selling fast', 'low': 'last pairs', 'out': 'sold out'}
<div class="size-container" role="group" aria-label="Sizes of {{product.name}}">
  <p class="size-container__title">Pick a size, then confirm</p>
  <div class="size-container__entries">
  % for item in product.items:
    % level = item.level
    <button type="button" class="size-container__entry size-container__entry--level-{{level}}" value="{{item.id}}" aria-pressed="false" aria-label="Size {{item.size}}, {{words[level]}}"{{!' disabled' if level == 'out' else ''}}>{{item.size}}</button>
  % end
  </div>
</div>
